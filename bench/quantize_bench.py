"""Quantization schemes on one trained checkpoint: artifact bytes and the post-quantization val_bpb gap.

    python bench/quantize_bench.py --weights STORE/objects/average-KEY --data STORE/objects/tokenize-KEY \\
        --out OUT_DIR [--schemes int8-zlib,int6-zstd22,best,fit] [--scheme "NAME FIELD=VALUE ..."] \
        [--set FIELD=VALUE] [--val-tokens 0] [--seq-len 1024] [--device auto]

--weights is an average artifact folder (weights.pt + average.json) or a train artifact folder
(final.pt / ema.pt + train.json; pick with --which). --data is the tokenize artifact folder the model
was trained on: calibration (GPTQ) and the fit's held-out slice come from its *train* shards, val_bpb
from its val shards. Every scheme is decoded from its blob with the shipped decoder before scoring, so
the gap is that of the artifact. Needs torch, numpy, sentencepiece; zstandard and brotli are optional:
a scheme that needs a missing one is skipped, and the JSON says which were skipped and why.
Writes OUT_DIR/quantize_bench.json (and fit_candidates.md for the fit scheme).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from artifacts.store import Artifact  # noqa: E402
from gpt.bpb import bits_per_byte  # noqa: E402
from gpt.model import GPT, ModelConfig  # noqa: E402
from gpt.qpack import COMPRESSORS, available_compressors  # noqa: E402
from gpt.quant import decode_weights  # noqa: E402
from gpt.devices import resolve_device  # noqa: E402
from gpt.quantization import QuantizeConfig, calibrate, quantize_weights  # noqa: E402
from shipping.assemble import shipped_code  # noqa: E402
from gpt.scoring import score_stream  # noqa: E402
from tokenizing.dataset import Dataset  # noqa: E402

# The schemes compared. int8-zlib is the official baseline's; int6-zstd22 the 03-19 record's storage
# (int6 blocks, int8 embedding, zstd-22); "best" the best fixed scheme on the tiny model
# (bench/results/quantize.md): GPTQ int7 blocks, int8 embedding, smallest compressor per section;
# "gptq6" the same one bit lower; "fit" the cap-fit search at --cap.
SCHEMES = {
    "int8-zlib": dict(method="rtn", bits=8, embed_bits=8, clip="pct:99.99984", compressor="zlib"),
    "int6-zstd22": dict(method="rtn", bits=6, embed_bits=8, clip="pct:99.99984", compressor="zstd"),
    "best": dict(method="gptq", bits=7, embed_bits=8, clip="pct:99.99984", compressor="best", shuffle="try"),
    "gptq6": dict(method="gptq", bits=6, embed_bits=8, clip="pct:99.99984", compressor="best", shuffle="try"),
    "fit": dict(mode="fit", method="gptq", compressor="best", shuffle="try", fit_bits="5,6,7,8",
                fit_clips="sd:12.85,sd:20,sd:32,pct:99.99984"),
}


def parse_fields(items: list[str]) -> dict:
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in QuantizeConfig.__dataclass_fields__:
            raise SystemExit(f"{item!r}: expected FIELD=VALUE with a QuantizeConfig field")
        kind = type(getattr(QuantizeConfig(), field))
        out[field] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def needs(over: dict) -> set[str]:
    c = over.get("compressor", "zstd")
    return {c} if c in COMPRESSORS else set()


def load_checkpoint(path: Path, which: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if (path / "average.json").exists():
        info, weights = json.loads((path / "average.json").read_text()), path / "weights.pt"
    elif (path / "train.json").exists():
        info, weights = json.loads((path / "train.json").read_text()), path / f"{which}.pt"
    else:
        raise SystemExit(f"{path}: neither an average artifact (average.json) nor a train artifact (train.json)")
    return ModelConfig(**info["model_config"]), torch.load(weights, map_location="cpu", weights_only=True)


def open_dataset(path: Path) -> Dataset:
    manifest = path / "manifest.json"
    if manifest.exists():
        return Dataset.open(Artifact(path, json.loads(manifest.read_text())))
    files = {f.name: {} for f in path.iterdir() if f.is_file()}  # a bare copy of the folder
    return Dataset.open(Artifact(path, {"stage": "tokenize", "key": path.name, "files": files}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--which", default="ema", choices=["ema", "final"], help="for a train artifact folder")
    p.add_argument("--data", type=Path, required=True, help="the tokenize artifact folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--val-tokens", type=int, default=0, help="score only the first N val tokens (0 = all)")
    p.add_argument("--seq-len", type=int, default=1024, help="context for calibration, held-out and val scoring")
    p.add_argument("--calib-seqs", type=int, default=64)
    p.add_argument("--cap", type=int, default=16_000_000)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a QuantizeConfig field for every scheme, e.g. keep_float_max_numel=1024 (tiny model)")
    p.add_argument("--scheme", action="append", default=[], metavar='"NAME FIELD=VALUE ..."',
                   help="define (or redefine) a scheme and add it to the run")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(a.device)
    model_cfg, state = load_checkpoint(a.weights, a.which)
    ds = open_dataset(a.data)
    schemes = {k: dict(v) for k, v in SCHEMES.items()}
    order = [s.strip() for s in a.schemes.split(",") if s.strip()]
    for spec in a.scheme:
        name, *fields = spec.split()
        schemes[name] = parse_fields(fields)
        if name not in order:
            order.append(name)
    common = parse_fields(a.set)

    # val tokens and bytes, as the eval stage counts them
    tokens, n_bytes = ds.val_stream(a.val_tokens)
    model = GPT(model_cfg).to(device).eval()

    def val_bpb(sd: dict) -> tuple[float, float]:
        model.load_state_dict(sd)
        t0 = time.perf_counter()
        nll = score_stream(model, tokens, a.seq_len, 0, 32, device)
        return bits_per_byte(float(nll.sum()), n_bytes), time.perf_counter() - t0

    have = set(available_compressors())
    pre, pre_s = val_bpb(state)
    print(f"pre-quantization val_bpb {pre:.5f} over {len(tokens) - 1:,} tokens ({pre_s:.1f} s)", flush=True)
    result = {"weights": str(a.weights), "data": str(a.data), "device": str(device),
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model_config": dataclasses.asdict(model_cfg),
              "params": sum(v.numel() for v in state.values()), "val_tokens": int(len(tokens) - 1),
              "val_bytes": n_bytes, "pre_quant_val_bpb": pre, "compressors_available": sorted(have),
              "skipped": {}, "schemes": {}}
    base = dict(seq_len=a.seq_len, calib_seqs=a.calib_seqs, cap_bytes=a.cap, fail_over_cap=False, device=a.device,
                **common)
    hessians = None
    for name in order:
        over = schemes[name]
        missing = needs(over) - have
        if missing:
            result["skipped"][name] = f"compressor not installed: {', '.join(sorted(missing))}"
            print(f"{name}: skipped ({result['skipped'][name]})", flush=True)
            continue
        cfg = QuantizeConfig(**{**base, **over})
        if (cfg.method == "gptq" or cfg.lqer_rank > 0) and hessians is None:
            hessians = calibrate(state, model_cfg, ds.shard_paths("train"), cfg, device)
        t0 = time.perf_counter()
        out = quantize_weights(state, model_cfg, cfg, ds.shard_paths("train"), shipped_code(), ds.val_stream, hessians)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        decoded, _ = decode_weights(out.blob)  # the artifact as the evaluator sees it
        decode_s = time.perf_counter() - t1
        bpb, eval_s = val_bpb(decoded)
        m = out.metrics
        row = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in over or k in base},
               "artifact_bytes": m["artifact_bytes"], "weights_bytes": m["weights_bytes"], "code_bytes": m["code_bytes"],
               "fits": m["fits"], "val_bpb": bpb, "gap_bpb": bpb - pre, "scheme": m["scheme"],
               "compressors": m["compressors"], "quant_rel_rmse": m["quant_rel_rmse"],
               "calibration_seconds": m["calibration_seconds"], "quantize_seconds": round(wall, 2),
               "compress_seconds": m["compress_seconds"], "decode_seconds": round(decode_s, 3),
               "eval_seconds": round(eval_s, 2), "sections": out.size["sections"]}
        if out.fit is not None:
            (a.out / "fit_candidates.md").write_text(out.fit.markdown)
            row["fit_chosen"] = out.fit.report["chosen"]
        result["schemes"][name] = row
        print(f"{name:<12} {row['artifact_bytes']:>12,} bytes  val_bpb {bpb:.5f}  gap {bpb - pre:+.5f}  "
              f"({m['scheme']}; {', '.join(m['compressors'])}; {wall:.1f} s)", flush=True)
        (a.out / "quantize_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "quantize_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
