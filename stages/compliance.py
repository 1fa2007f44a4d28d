"""compliance: the challenge's rules checked from the artifacts, PASS or FAIL with the evidence used.

Checks: the artifact's bytes (weights blob + shipped code, measured from the files) against the cap;
training and evaluation seconds against their limits, with the hardware they ran on; no validation
document among the training documents (by content hash); and val_bpb recomputed from the eval stage's
per-token losses with bytes counted a second, independent way (decoding each document's tokens back
to text). A FAIL is a result, not an error: the artifact records it and ``golf run`` exits non-zero.

Run it alone:  python -m stages.compliance --input tokenize=KEY --input train=KEY --input quantize=KEY --input eval=KEY
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from artifacts import Artifact, Stage, StageContext
from .bpb import bits_per_byte
from .shards import load_split
from .tokenize import Dataset

log = logging.getLogger("golf.compliance")


@dataclass(frozen=True)
class ComplianceConfig:
    cap_bytes: int = 16_000_000     # decimal bytes, code included (the challenge's rule)
    train_limit_s: float = 600.0    # training wallclock on 8x H100 SXM
    eval_limit_s: float = 600.0     # evaluation wallclock on 8x H100 SXM
    bpb_rel_tolerance: float = 1e-9  # recomputed val_bpb must agree this closely


def check(name: str, ok: bool, evidence: str, warning: str | None = None) -> dict:
    return {"check": name, "status": "PASS" if ok else "FAIL", "evidence": evidence, "warning": warning}


def decoded_bytes(sp, tokens: np.ndarray, bos: int) -> int:
    """UTF-8 bytes of the text the scored tokens (all but the first) decode to, document by document."""
    total = 0
    starts = np.flatnonzero(tokens == bos).tolist() + [len(tokens)]
    if starts[0] != 0:
        starts = [0] + starts
    for a, b in zip(starts[:-1], starts[1:]):
        ids = [int(t) for t in tokens[a:b] if t != bos]
        total += len(sp.decode(ids).encode("utf-8"))
    return total


def hardware(train_env: dict) -> str:
    gpus = train_env.get("gpu_count") or 0
    return f"{gpus}x {train_env.get('gpu_name')}" if gpus else f"CPU ({train_env.get('cpu_count')} cores)"


def build(cfg: ComplianceConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    import sentencepiece as spm

    q, tr, ev, tok = inputs["quantize"], inputs["train"], inputs["eval"], inputs["tokenize"]
    checks, warnings = [], []

    # size: measured from the files that ship
    weights = q.file("weights.bin").stat().st_size
    code = q.file("shipped_code.py").stat().st_size
    total = weights + code
    checks.append(check("size", total <= cfg.cap_bytes,
                        f"weights.bin {weights:,} + shipped_code.py {code:,} = {total:,} bytes; cap {cfg.cap_bytes:,}; "
                        f"{'margin' if total <= cfg.cap_bytes else 'excess'} {abs(cfg.cap_bytes - total):,}"))

    # time ledger
    hw = hardware(tr.manifest.get("environment", {}))
    world = tr.metrics.get("world_size", 1)
    on_target = "H100" in hw and world == 8 and hw.startswith("8x")
    hw_note = None if on_target else f"measured on {hw}, not 8x H100 SXM: not a compliant timing"
    train_s = tr.metrics["train_seconds"]
    checks.append(check("train_time", train_s <= cfg.train_limit_s,
                        f"training loop {train_s:.1f} s (compile warm-up {tr.metrics.get('warmup_seconds', 0):.1f} s "
                        f"excluded, as the records do) on {hw}; limit {cfg.train_limit_s:.0f} s", hw_note))
    eval_s = ev.metrics["eval_seconds"] + ev.metrics.get("load_seconds", 0.0)
    checks.append(check("eval_time", eval_s <= cfg.eval_limit_s,
                        f"decode {ev.metrics.get('load_seconds', 0):.1f} s + scoring {ev.metrics['eval_seconds']:.1f} s "
                        f"= {eval_s:.1f} s on {ev.manifest.get('environment', {}).get('gpu_name') or 'CPU'}; "
                        f"limit {cfg.eval_limit_s:.0f} s (pre-quantization scoring is a diagnostic, not counted)",
                        hw_note))

    # data: validation documents must not be in the training split
    val_h = np.load(tok.file("doc_hashes_val.npy"))
    train_h = np.load(tok.file("doc_hashes_train.npy"))
    leaked = int(np.isin(train_h, val_h).sum())
    checks.append(check("val_not_in_train", leaked == 0,
                        f"{len(val_h):,} val documents vs {len(train_h):,} train documents by SHA-256 of their text: "
                        f"{leaked} shared"))

    # val_bpb recomputed: NLLs from the eval stage, bytes by decoding the documents
    ds = Dataset.open(tok)
    tokens = load_split(ds.shard_paths("val"))
    nll = np.load(ev.file("token_nll.npy"))
    tokens = tokens[:len(nll) + 1]
    sp = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    n_bytes = decoded_bytes(sp, tokens, ds.info["bos_id"])
    recomputed = bits_per_byte(float(nll.sum()), n_bytes)
    reported = ev.metrics["val_bpb"]
    rel = abs(recomputed - reported) / reported
    checks.append(check("bpb_recomputed", rel <= cfg.bpb_rel_tolerance and n_bytes == ev.metrics["val_bytes"],
                        f"{len(nll):,} token NLLs / {n_bytes:,} bytes decoded from the documents "
                        f"(eval counted {ev.metrics['val_bytes']:,}): {recomputed:.10f} vs reported {reported:.10f} "
                        f"(relative difference {rel:.1e})"))
    checks.append(check("ttt_order", True, "no test-time training in this run: nothing is adapted on"))

    warnings = sorted({c["warning"] for c in checks if c["warning"]})
    verdict = "PASS" if all(c["status"] == "PASS" for c in checks) else "FAIL"
    report = {"verdict": verdict, "checks": checks, "warnings": warnings, "val_bpb": reported,
              "artifact_bytes": total}
    (ctx.dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Compliance: {verdict}", "", "| check | status | evidence |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['status']} | {c['evidence']} |" for c in checks]
    if warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in warnings]
    (ctx.dir / "report.md").write_text("\n".join(lines) + "\n")
    for c in checks:
        log.info("%-16s %s  %s", c["check"], c["status"], c["evidence"])
    return {"verdict": verdict, "failed": [c["check"] for c in checks if c["status"] == "FAIL"],
            "warnings": len(warnings), "artifact_bytes": total, "val_bpb": reported}


STAGE = Stage(name="compliance", config=ComplianceConfig, inputs=("tokenize", "train", "quantize", "eval"),
              build=build, module=__name__)


if __name__ == "__main__":
    from golf.stage_cli import stage_main
    stage_main(STAGE)
