"""quantize: averaged weights -> the compressed artifact, with its bytes counted as the challenge does.

Large matrices are quantized per row to ``bits`` (the tied embedding to ``embed_bits``) with a
percentile clip; small tensors stay float16. The packed payload is compressed (zstd, zlib, lzma or
brotli). The artifact size is the compressed weights plus the wrapped shipped code (``stages.ship``).
The blob is decoded again and compared with the in-memory quantized weights bit for bit.

Run it alone:  python -m stages.quantize --input average=KEY --set bits=6
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from artifacts import Artifact, Stage, StageContext
from .average import load_weights
from .quant import decode_weights, dequantize_rows, encode_weights, quantize_rows
from .ship import shipped_code

log = logging.getLogger("golf.quantize")
CAP_BYTES = 16_000_000  # the challenge's cap, decimal bytes, code included


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 8                       # per-row integer bits for block matrices (2..8)
    embed_bits: int = 8                 # bits for the tied embedding
    clip_percentile: float = 99.99984   # per-row clip of |w| (the official baseline's value; 100 = max)
    keep_float_max_numel: int = 65_536  # tensors with at most this many elements stay float16
    compressor: str = "zstd"            # zstd | zlib | lzma | brotli | none
    level: int = 22                     # compressor level (zstd 1-22, zlib 0-9, lzma 0-9, brotli 0-11)
    cap_bytes: int = CAP_BYTES          # the size cap the artifact must fit
    fail_over_cap: bool = False         # stop here when over the cap (else compliance reports it)


class OverCap(RuntimeError):
    pass


def quantize_state(state: dict[str, torch.Tensor], cfg: QuantizeConfig) -> dict[str, dict]:
    out = {}
    for name, w in state.items():
        if w.ndim == 2 and w.numel() > cfg.keep_float_max_numel:
            bits = cfg.embed_bits if name == "embed.weight" else cfg.bits
            if not 2 <= bits <= 8:
                raise ValueError(f"quantize: bits must be in 2..8, got {bits} for {name}")
            q, scale = quantize_rows(w, bits, cfg.clip_percentile)
            out[name] = {"q": q, "scale": scale, "bits": bits}
        else:
            out[name] = {"float": w.detach().to(torch.float16)}
    return out


def dequantize_state(qstate: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {n: dequantize_rows(t["q"], t["scale"]) if "q" in t else t["float"].float() for n, t in qstate.items()}


def build(cfg: QuantizeConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    model_cfg, state = load_weights(inputs["average"])
    t0 = time.perf_counter()
    qstate = quantize_state(state, cfg)
    deq = dequantize_state(qstate)
    meta = {"model_config": dataclasses.asdict(model_cfg)}
    blob = encode_weights(qstate, meta, cfg.compressor, cfg.level)
    compress_s = time.perf_counter() - t0
    (ctx.dir / "weights.bin").write_bytes(blob)

    # round trip: what an evaluator decodes must equal what we quantized, bit for bit
    t1 = time.perf_counter()
    decoded, _ = decode_weights((ctx.dir / "weights.bin").read_bytes())
    decompress_s = time.perf_counter() - t1
    for name, w in deq.items():
        if not torch.equal(decoded[name], w):
            raise RuntimeError(f"round trip failed: tensor {name} differs after decoding the blob")

    readable, wrapped = shipped_code()
    (ctx.dir / "shipped_code.py").write_text(wrapped)
    (ctx.dir / "shipped_code_readable.py").write_text(readable)
    code_bytes = len(wrapped.encode("utf-8"))
    weights_bytes = len(blob)
    total = weights_bytes + code_bytes

    rows, sq_err, sq_ref = [], 0.0, 0.0
    for name, w in state.items():
        err = float((deq[name] - w.float()).pow(2).sum())
        ref = float(w.float().pow(2).sum())
        sq_err, sq_ref = sq_err + err, sq_ref + ref
        t = qstate[name]
        rows.append({"tensor": name, "shape": list(w.shape), "scheme": f"int{t['bits']}" if "q" in t else "float16",
                     "rel_rmse": (err / ref) ** 0.5 if ref else 0.0})
    report = {"weights_bytes": weights_bytes, "code_bytes": code_bytes, "artifact_bytes": total,
              "cap_bytes": cfg.cap_bytes, "margin_bytes": cfg.cap_bytes - total, "tensors": rows,
              "code_bytes_readable": len(readable.encode("utf-8"))}
    (ctx.dir / "size.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("artifact %s bytes = weights %s + code %s (cap %s, margin %s)", f"{total:,}", f"{weights_bytes:,}",
             f"{code_bytes:,}", f"{cfg.cap_bytes:,}", f"{cfg.cap_bytes - total:,}")
    if total > cfg.cap_bytes and cfg.fail_over_cap:
        raise OverCap(f"artifact is {total:,} bytes, {total - cfg.cap_bytes:,} over the cap of {cfg.cap_bytes:,} "
                      f"(weights {weights_bytes:,} + code {code_bytes:,}); lower quantize.bits or change compressor")
    return {"artifact_bytes": total, "weights_bytes": weights_bytes, "code_bytes": code_bytes,
            "cap_bytes": cfg.cap_bytes, "fits": total <= cfg.cap_bytes, "quant_rel_rmse": (sq_err / sq_ref) ** 0.5,
            "compress_seconds": round(compress_s, 3), "decompress_seconds": round(decompress_s, 3)}


STAGE = Stage(name="quantize", config=QuantizeConfig, inputs=("average",), build=build, module=__name__)


if __name__ == "__main__":
    from golf.stage_cli import stage_main
    stage_main(STAGE)
