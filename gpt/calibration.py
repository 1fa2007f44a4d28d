"""The calibration record: what quantize read to calibrate (GPTQ Hessians, LQER), written once, read once.

Calibration reads training tokens after the training loop, so the rules care about two facts: which data it
read (never the val split) and how long it took (counted in the 600 s training budget). quantize writes both
into ``calibration.json`` of its artifact with :meth:`CalibrationRecord.write`; compliance reads that file
with :func:`read_calibration` for its calibration check and its training ledger. Nothing else carries them
(quantize's metrics show a copy made from the same record, for tables; no check reads the metrics).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FILE = "calibration.json"


class CalibrationFileError(ValueError):
    """calibration.json is not a record this module wrote (the artifact and the problem are named)."""


@dataclass(frozen=True)
class CalibrationRecord:
    source: str                 # the split the tokens came from: "train" (val is against the rules)
    shards: tuple[str, ...]     # shard file names, in the order read
    tokens: int                 # how many tokens were read
    seconds: float              # wall time of the calibration forward passes (counted in the training budget)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / FILE
        path.write_text(json.dumps({**dataclasses.asdict(self), "shards": list(self.shards)}, indent=2) + "\n")
        return path

    def metrics(self) -> dict:
        """The copy shown in quantize's metrics (tables, the sweep); compliance reads the file."""
        return {"calibration_seconds": self.seconds, "calibration_tokens": self.tokens,
                "calibration_shards": list(self.shards)}


def calibrates(quantize_config: dict) -> bool:
    """Whether a quantize config reads calibration data: GPTQ, or LQER's output-error ranking and factors."""
    return quantize_config.get("method") == "gptq" or int(quantize_config.get("lqer_rank") or 0) > 0


def read_calibration(artifact) -> CalibrationRecord | None:
    """The record of a quantize artifact, None when it has no calibration.json (it read no data)."""
    if FILE not in artifact.manifest.get("files", {}):
        return None
    where = f"{artifact.key}/{FILE}"
    try:
        data = json.loads(artifact.file(FILE).read_text())
        fields = {f.name for f in dataclasses.fields(CalibrationRecord)}
        if not isinstance(data, dict) or set(data) != fields:
            raise CalibrationFileError(f"{where}: expected the fields {', '.join(sorted(fields))}")
        return CalibrationRecord(source=str(data["source"]), shards=tuple(str(s) for s in data["shards"]),
                                 tokens=int(data["tokens"]), seconds=float(data["seconds"]))
    except json.JSONDecodeError as e:
        raise CalibrationFileError(f"{where}: not valid JSON ({e.msg})") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CalibrationFileError):
            raise
        raise CalibrationFileError(f"{where}: {e}") from None
