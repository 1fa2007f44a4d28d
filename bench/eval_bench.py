"""Eval variants on one artifact, with their eval seconds, on 1..N processes (GPUs); JSON + a table to --out.

    python bench/eval_bench.py --store $GOLF_STORE --quantize quantize-KEY --tokenize tokenize-KEY \
        --preset record --out bench/results/gpu/eval --nproc 1,2,4 [--max-tokens N] [--set ttt.lora_rank=80]

Variants: plain (non-overlapping windows), sliding64, isolated64 (documents on their own, stride 64),
ttt_sgd, ttt_lora, ttt_phased (stride 64; lora and phased isolate documents). Each run is the eval stage's
own worker (``python -m artifacts.worker --stage-module stages.evaluate``, under torchrun when nproc > 1) in a fresh process; its
files (eval.json, token_nll.npy, ttt_log.jsonl) land in --out/<variant>_<n>p/. No budget is enforced
(budget_seconds=0) so each figure is measured to the end; the table marks totals over 600 s. The
``--preset`` supplies the eval defaults (seq_len must be what the model was trained with); ``--set`` changes
eval fields for every variant. Needs torch, numpy, sentencepiece, tqdm (no Prefect), and the blob's
compressor (brotli/zstandard) when the artifact uses one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIELDS = ("val_bpb", "val_loss", "val_tokens", "eval_seconds", "ttt_seconds", "load_seconds", "total_eval_seconds",
          "warmup_seconds", "adapt_steps", "budget_stop", "pre_quant_val_bpb", "seq_len", "stride", "doc_isolation",
          "ttt")
VARIANTS = {
    "plain": ["stride=0"],
    "sliding64": ["stride=64"],
    "isolated64": ["stride=64", "doc_isolation=true"],
    "ttt_sgd": ["stride=64", "ttt.method=sgd"],
    "ttt_lora": ["stride=64", "doc_isolation=true", "ttt.method=lora"],
    "ttt_phased": ["stride=64", "doc_isolation=true", "ttt.method=phased"],
}


def main(argv: list[str] | None = None) -> list[dict]:
    import dataclasses

    import numpy as np
    import torch
    from artifacts import ArtifactStore
    from golf.config import apply_overrides, preset
    from stages import compliance as C

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default=os.environ.get("GOLF_STORE", "golf-store"))
    p.add_argument("--quantize", required=True, help="quantize artifact key")
    p.add_argument("--tokenize", required=True, help="tokenize artifact key")
    p.add_argument("--average", default=None, help="average artifact key (then plain also reports pre-quant val_bpb)")
    p.add_argument("--preset", default="record")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="an eval field, every variant")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--nproc", default="1", help="comma-separated process counts, e.g. 1,2,4")
    p.add_argument("--max-tokens", type=int, default=0, help="score the first N val tokens (0 = all)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    store = ArtifactStore(a.store)
    arts = {"quantize": store.get(a.quantize), "tokenize": store.get(a.tokenize)}
    arts["average"] = store.get(a.average) if a.average else arts["quantize"]  # unused unless pre_quant
    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else f"CPU ({os.cpu_count()} cores)"
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in a.nproc.split(",")]:
        if gpus and n > gpus:
            print(f"skipping {n} processes: {gpus} GPUs", file=sys.stderr)
            continue
        for name in a.variants.split(","):
            sets = ["budget_seconds=0", "no_ttt_diagnostic=false", f"nproc={n}", f"max_tokens={a.max_tokens}",
                    f"pre_quant={'true' if a.average and name == 'plain' else 'false'}"] + VARIANTS[name] + a.set
            cfg = apply_overrides(preset(a.preset), [f"eval.{s}" for s in sets]).eval
            out = a.out / f"{name}_{n}p"
            out.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "artifacts.worker", "--stage-module", "stages.evaluate", "--key", "bench",
                   "--dir", str(out), "--work", str(out), "--config-json",
                   json.dumps(dataclasses.asdict(cfg))] + [f"--input={r}={arts[r].path}" for r in arts]
            if n > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] + cmd[1:]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})  # keep carried packages visible
            row = {"variant": name, "nproc": n, "device": device, "wall_seconds": round(time.perf_counter() - t, 1),
                   "returncode": proc.returncode}
            if proc.returncode == 0:
                info = json.loads((out / "eval.json").read_text())
                row.update({k: info.get(k) for k in FIELDS})
                if (out / "ttt_log.jsonl").exists():  # replay the log as the compliance stage would
                    n_scored = len(np.load(out / "token_nll.npy"))
                    row["ttt_order"] = C.check_ttt_order(C.read_ttt_log(out / "ttt_log.jsonl"), n_scored)["status"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            summary = {"config": {**vars(a), "out": str(a.out)}, "runs": rows}
            (a.out / "eval_bench.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"Eval variants on {device}; {rows[0].get('val_tokens') if rows else '?'} val tokens", "",
             "| variant | procs | val_bpb | scoring + TTT s | TTT s | decode s | total s | warm-up s (not counted) "
             "| TTT order |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["returncode"]:
            lines.append(f"| {r['variant']} | {r['nproc']} | failed (exit {r['returncode']}) | | | | | | |")
            continue
        total, load = r["total_eval_seconds"], r["load_seconds"]
        over = " (over 600 s)" if total > 600 else ""
        lines.append(f"| {r['variant']} | {r['nproc']} | {r['val_bpb']:.5f} | {total - load:.1f} | "
                     f"{r.get('ttt_seconds') or 0:.1f} | {load:.1f} | {total:.1f}{over} | {r['warmup_seconds']:.1f} | "
                     f"{r.get('ttt_order', '-')} |")
    (a.out / "eval_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
