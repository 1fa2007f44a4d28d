"""quantize: averaged weights -> the compressed artifact, with its bytes counted as the challenge does.

Matrices are quantized per row, per tensor group (the tied embedding, attention q/k/v/out, MLP fc/proj)
with its own bit width (2..8) and clip rule (percentile, SDClip ``sd:K``, or a per-row search), by
round to nearest or by GPTQ with Hessians from *training*-data calibration batches (their seconds are
reported as ``calibration_seconds``: they count toward the training budget). Optionally the worst
tensors get a low-rank error correction (LQER). Small control tensors stay float16/float32. Each
(group, dtype) section is compressed with zlib, zstd-22, lzma-9e or brotli-11 (or the smallest of them),
optionally byte-shuffled. The artifact size is the blob plus the wrapped shipped code: train_gpt.py
(``shipping.assemble``), the program that reruns this whole run (train, average, quantize, eval), with the run's
configs embedded (train's and average's from the average artifact, eval's from ``ship_eval``, which golf run fills
in), written here as shipped_code.py and program.json; the blob is decoded again and compared with the in-memory
quantized weights bit for bit.

``mode=fit`` searches bits x clip per group for the best predicted quality whose exact bytes fit
``cap_bytes - fit_margin_bytes`` (``gpt.capfit``), and writes the candidate table.

Run it alone:  golf stage quantize --input average=KEY --input tokenize=KEY --set method=gptq --set bits=6
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from typing import Mapping

from artifacts import Artifact, Stage, StageContext
from artifacts.runner import code_digest
from artifacts.store import file_problems
from gpt.averaging import load_averaged
from gpt.quantization import (CAP_BYTES, WEIGHTS_INDEPENDENT, OverCap, QuantizeConfig,  # noqa: F401  (the stage's config)
                              check_cap, quantize_weights)
from shipping.assemble import shipped_code
from tokenizing.dataset import Dataset

log = logging.getLogger("golf.quantize")
# what a reused artifact's files give this one as they are (size.json and the code are made anew)
REUSED_FILES = ("weights.bin", "calibration.json")


def data_names(vocab_size: int) -> dict:
    """The records' names for the dataset's and tokenizer's places under ./data (train_gpt.py's defaults)."""
    return {"dataset": f"fineweb10B_sp{vocab_size}", "tokenizer": f"fineweb_{vocab_size}_bpe.model"}


def program_config(cfg: QuantizeConfig, avg: Artifact, ds: Dataset) -> dict:
    """The configs train_gpt.py embeds: the run that made these weights, and the eval that will score them."""
    report = json.loads(avg.file("average.json").read_text())
    # reuse_weights is how the stage got its weights, not a setting of the run: not shipped (it is not in the key)
    quantize = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("ship_eval", "reuse_weights")}
    return {"train": report.get("train_config", {}), "average": avg.config, "quantize": quantize,
            "eval": json.loads(cfg.ship_eval) if cfg.ship_eval else {}, "data": data_names(ds.vocab_size)}


def weights_twin(cfg: QuantizeConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> Artifact | None:
    """A quantize artifact in this store whose weights are this one's: the same stage code and inputs, the same
    settings but for WEIGHTS_INDEPENDENT, its files intact. mode=fit has none: its choice depends on the code bytes."""
    if cfg.mode != "fixed" or not cfg.reuse_weights or ctx.forced:
        return None
    objects = inputs["average"].path.parent
    digest, _ = code_digest(__name__)
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in WEIGHTS_INDEPENDENT}
    ours = {role: inputs[role].key for role in STAGE.inputs}
    ours_content = {role: inputs[role].content_digest for role in STAGE.inputs}  # a forced rebuild keeps the key
    for d in sorted(objects.glob("quantize-*")):
        if d.name == ctx.key:
            continue
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue  # not a committed artifact (or a damaged one): never a source
        theirs = {k: v for k, v in manifest.get("config", {}).items() if k not in WEIGHTS_INDEPENDENT}
        if manifest.get("code_digest") != digest or manifest.get("inputs") != ours \
                or manifest.get("input_content") != ours_content or theirs != mine:
            continue
        listed = {n: m for n, m in manifest.get("files", {}).items() if n in REUSED_FILES + ("size.json",)}
        if "weights.bin" not in listed or "size.json" not in listed or file_problems(d, listed):
            continue
        return Artifact(d, manifest)
    return None


def reuse(twin: Artifact, cfg: QuantizeConfig, program: dict, ctx: StageContext) -> tuple[dict, str, str] | None:
    """This artifact from the twin's weights and its own code: (metrics, wrapped code, readable code); None when the
    twin's files cannot be read or no longer match its manifest (removed or damaged meanwhile): quantize anew."""
    listed = {n: m for n, m in twin.manifest["files"].items() if n in REUSED_FILES + ("size.json",)}
    try:
        size = json.loads(twin.file("size.json").read_text())
        for name in listed:
            if name != "size.json":
                shutil.copyfile(twin.path / name, ctx.dir / name)
        problems = file_problems(ctx.dir, {n: m for n, m in listed.items() if n != "size.json"})
    except (OSError, ValueError) as e:
        problems = [str(e)]
    if problems:
        log.warning("not reusing the weights of %s (%s): quantizing anew", twin.key, problems[0])
        for name in listed:
            (ctx.dir / name).unlink(missing_ok=True)
        return None
    readable, wrapped = shipped_code(program)
    code_bytes = len(wrapped.encode("utf-8"))
    total = size["weights_bytes"] + code_bytes
    size.update(code_bytes=code_bytes, artifact_bytes=total, cap_bytes=cfg.cap_bytes, margin_bytes=cfg.cap_bytes - total,
                code_bytes_readable=len(readable.encode("utf-8")))
    log.info("weights.bin from %s (the same weights: only the embedded eval or the cap differ); the code assembled "
             "again (--force quantize, or a new key with quantize.reuse_weights=false, quantizes anew)", twin.key)
    check_cap(size, cfg)
    (ctx.dir / "size.json").write_text(json.dumps(size, indent=2) + "\n")
    metrics = dict(twin.metrics, artifact_bytes=total, code_bytes=code_bytes, cap_bytes=cfg.cap_bytes,
                   fits=total <= cfg.cap_bytes, margin_bytes=cfg.cap_bytes - total, weights_from=twin.key)
    return metrics, wrapped, readable


def build(cfg: QuantizeConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    avg = inputs["average"]
    ds = Dataset.open(inputs["tokenize"])
    program = program_config(cfg, avg, ds)
    twin = weights_twin(cfg, inputs, ctx)
    reused = reuse(twin, cfg, program, ctx) if twin is not None else None
    if reused is not None:
        metrics, wrapped, readable = reused
        (ctx.dir / "program.json").write_text(json.dumps(program, indent=2, sort_keys=True) + "\n")
        (ctx.dir / "shipped_code.py").write_text(wrapped)
        (ctx.dir / "shipped_code_readable.py").write_text(readable)
        return metrics
    model_cfg, state = load_averaged(avg.file("weights.pt"), avg.file("average.json"))
    out = quantize_weights(state, model_cfg, cfg, ds.shard_paths("train"), shipped_code(program), ds.val_stream)
    (ctx.dir / "program.json").write_text(json.dumps(program, indent=2, sort_keys=True) + "\n")
    (ctx.dir / "weights.bin").write_bytes(out.blob)
    (ctx.dir / "shipped_code.py").write_text(out.wrapped_code)
    (ctx.dir / "shipped_code_readable.py").write_text(out.readable_code)
    (ctx.dir / "size.json").write_text(json.dumps(out.size, indent=2) + "\n")
    if out.calibration is not None:
        out.calibration.write(ctx.dir)
    if out.fit is not None:
        (ctx.dir / "candidates.json").write_text(json.dumps(out.fit.report, indent=2) + "\n")
        (ctx.dir / "candidates.md").write_text(out.fit.markdown)
    # the file on disk is what ships: the bytes in memory were decoded and compared above, so equal bytes suffice
    if (ctx.dir / "weights.bin").read_bytes() != out.blob:
        raise RuntimeError("weights.bin on disk differs from the blob that was verified in memory")
    return out.metrics


STAGE = Stage(name="quantize", config=QuantizeConfig, inputs=("average", "tokenize"), build=build, module=__name__,
              headline=("artifact_bytes",))
