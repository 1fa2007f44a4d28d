"""Compare train runs' loss curves step by step: a multi-GPU run against one GPU, beside seed noise.

    python bench/compare_runs.py --ref RUN_1GPU RUN_2GPU RUN_1GPU_OTHER_SEED [--plot curves.png] [--json out.json]

Each RUN is a folder with the train stage's metrics.jsonl, train.json and manifest.json (a train artifact,
or what bench/gpu_multi.sh brings back). For each run: world size, seed, steps, tokens/s, and the mean
absolute loss difference from --ref over all steps and over the last 50. A run on more GPUs with the same
global batch follows the reference "within noise" when its difference is no larger than another seed's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(run: Path) -> dict:
    cfg = json.loads((run / "manifest.json").read_text())["config"]
    info = json.loads((run / "train.json").read_text())
    loss = np.array([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()])
    return {"run": run.name, "world_size": info["world_size"], "seed": cfg["seed"], "steps": info["steps"],
            "tokens_per_s": info["tokens_per_s"], "tokens_per_s_per_gpu": info["tokens_per_s_per_process"],
            "final_loss_mean10": round(float(loss[-10:].mean()), 4), "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", type=Path, required=True, help="the reference run (one GPU)")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    ref = load(a.ref)
    rows = [ref] + [load(r) for r in a.runs]
    print("| run | GPUs | seed | steps | tokens/s | vs 1 GPU | mean abs loss diff (all) | (last 50) | loss, last 10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = min(len(r["loss"]), len(ref["loss"]))
        d = np.abs(r["loss"][:n] - ref["loss"][:n])
        r["mean_abs_diff"], r["mean_abs_diff_last50"] = round(float(d.mean()), 4), round(float(d[-50:].mean()), 4)
        r["speedup"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 2)
        print(f"| {r['run']} | {r['world_size']} | {r['seed']} | {r['steps']} | {r['tokens_per_s']:,} | "
              f"{r['speedup']}x | {r['mean_abs_diff']} | {r['mean_abs_diff_last50']} | {r['final_loss_mean10']} |")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for r in rows:
            label = f"{r['world_size']} GPU, seed {r['seed']}"
            steps = np.arange(1, len(r["loss"]) + 1)
            ax[0].plot(steps, r["loss"], lw=1, label=label)
            ax[1].plot(steps, r["loss"] - ref["loss"][:len(steps)], lw=1, label=label)
        ax[0].set(xlabel="step", ylabel="train loss", ylim=(None, float(np.percentile(ref["loss"], 98))))
        ax[1].set(xlabel="step", ylabel="loss - reference (1 GPU)")
        ax[0].legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "loss"} for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
