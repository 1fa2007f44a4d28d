"""Issue 19's comparison: the records folder's train_gpt.py against the pipeline's train stage, step by step.

    python bench/program_parity_compare.py <unpacked program_parity.tar.gz> --out bench/results/program

Reads what bench/gpu_program_parity.sh keeps: pipeline/train/metrics.jsonl and program_metrics.jsonl (every step's
loss), pipeline/{train,quantize,eval}/*.json and program_result.json. Writes program_parity.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def steps(path: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, path.read_text().splitlines())}


def tokens_per_s(ms: dict[int, dict], recurrence: bool) -> float | None:
    """Tokens over seconds of the steps with recurrence on (or off), the first step left out (its warm-up)."""
    sel = [m for s, m in ms.items() if s > 1 and m.get("recurrence", False) == recurrence]
    return sum(m["tokens_per_s"] * m["step_ms"] for m in sel) / sum(m["step_ms"] for m in sel) if sel else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    f = a.folder
    pipe, prog = steps(f / "pipeline/train/metrics.jsonl"), steps(f / "program_metrics.jsonl")
    common = sorted(set(pipe) & set(prog))
    diffs = [prog[s]["loss"] - pipe[s]["loss"] for s in common]
    p_eval = json.loads((f / "pipeline/eval/eval.json").read_text())
    p_size = json.loads((f / "pipeline/quantize/size.json").read_text())
    res = json.loads((f / "program_result.json").read_text())
    out = {
        "steps_compared": len(common), "pipeline_steps": len(pipe), "program_steps": len(prog),
        "max_abs_loss_diff": max(map(abs, diffs)), "mean_loss_diff": sum(diffs) / len(diffs),
        "final_loss": {"pipeline": pipe[common[-1]]["loss"], "program": prog[common[-1]]["loss"]},
        "val_bpb": {"pipeline": p_eval["val_bpb"], "program": res["val_bpb"]},
        "artifact_bytes": {"pipeline": p_size["artifact_bytes"], "program": res["artifact_bytes"]},
        "code_bytes": {"pipeline": p_size["code_bytes"], "program": res["code_bytes"]},
        "weights_bin_identical": res.get("weights_bin_identical"),
        "tokens_per_s": {side: {"recurrence_off": tokens_per_s(ms, False), "recurrence_on": tokens_per_s(ms, True)}
                         for side, ms in (("pipeline", pipe), ("program", prog))},
        "program_wall_s": res.get("program_wall_s"),
        "gpu": (f / "gpu.txt").read_text().strip() if (f / "gpu.txt").exists() else "",
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "program_parity.json").write_text(json.dumps(out, indent=2) + "\n")

    def fmt(v):
        return "-" if v is None else (f"{v:,.0f}" if abs(v) > 1000 else f"{v:.6f}")
    rows = [("train loss, max abs diff over the steps", fmt(out["max_abs_loss_diff"]), ""),
            ("train loss, mean diff (program - pipeline)", f"{out['mean_loss_diff']:+.6f}", ""),
            *((f"{k}", fmt(v["pipeline"]), fmt(v["program"])) for k, v in
              (("final train loss", out["final_loss"]), ("val_bpb", out["val_bpb"]),
               ("artifact bytes", out["artifact_bytes"]), ("code bytes", out["code_bytes"]))),
            *((f"tokens/s, recurrence {k.split('_')[1]}", fmt(out["tokens_per_s"]["pipeline"][k]),
               fmt(out["tokens_per_s"]["program"][k])) for k in ("recurrence_off", "recurrence_on"))]
    md = ["| figure | pipeline (train stage) | records folder's train_gpt.py |", "|---|---:|---:|"]
    md += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    md.append(f"\n{len(common)} steps compared; weights.bin identical: {out['weights_bin_identical']}; {out['gpu']}")
    (a.out / "program_parity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(common, [pipe[s]["loss"] for s in common], label="pipeline: golf run (train stage)")
    ax.plot(common, [prog[s]["loss"] for s in common], "--", label="records folder: torchrun train_gpt.py")
    ax.set_ylabel("train loss (nats)")
    ax.legend()
    ax.set_title("--preset record: the submitted train_gpt.py against the pipeline")
    bx.plot(common, diffs, color="k")
    bx.axhline(0, lw=0.5, color="gray")
    bx.set_xlabel("step")
    bx.set_ylabel("program - pipeline")
    fig.tight_layout()
    fig.savefig(a.out / "program_parity.png", dpi=110)


if __name__ == "__main__":
    main()
