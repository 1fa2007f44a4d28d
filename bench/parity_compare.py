"""Compare golf's training curve with a reference script's, from bench/parity.sh's logs: a table, a plot, a verdict.

    python bench/parity_compare.py --which record --ref R1.log --ref R2.log --golf DIR [--golf-isolated DIR] \
        [--golf-postquant DIR] --out bench/results/parity/record

The reference logs are the scripts' own (record: ``10/200 train_loss: 6.7951 train_time: 0.1m tok/s: 996000``;
baseline: ``step:10/200 train_loss:5.9083 train_time:1234ms``); a golf run is the folder parity.sh copies out of
the store (metrics.jsonl, train.json, eval.json). Issue 16's bands: golf within 0.06 nats of the reference seeds'
mean at every logged step from 10 on, mean difference under 0.03, raw val_bpb within 0.02.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

BAND, MEAN_BAND, BPB_BAND = 0.06, 0.03, 0.02
TRAIN_LINE = re.compile(r"(?:step:)?(\d+)/(\d+) train_loss:\s*([\d.]+)(?:.*?train_time:\s*([\d.]+)(ms|m))?"
                        r"(?:.*?tok/s:\s*(\d+))?")
VAL_LINE = re.compile(r"(?:step:)?(\d+)/(\d+) val_loss:\s*([\d.]+) val_bpb:\s*([\d.]+)")
BATCH = {"record": 786_432, "baseline": 524_288}
# the record script's lines after training (parity.sh POSTQUANT=1): its EMA weights' score, its artifact, its
# quantized score
REF_POST = {"pre_quant_val_bpb": re.compile(r"diagnostic pre-quantization post-ema val_loss:\S+ val_bpb:([\d.]+)"),
            "val_bpb": re.compile(r"diagnostic quantized val_loss:\S+ val_bpb:([\d.]+)"),
            "artifact_bytes": re.compile(r"Total submission size quantized\+\w+: (\d+) bytes")}


def read_reference(path: Path, batch: int) -> dict:
    """{'loss': {step: nats}, 'seconds': {step: training seconds}, 'val_bpb': raw score at the last step}."""
    loss, seconds, val = {}, {}, None
    for line in path.read_text(errors="replace").splitlines():
        if (m := VAL_LINE.search(line)) and "post-ema" not in line:
            val = float(m.group(4))
            continue
        if m := TRAIN_LINE.search(line):
            step = int(m.group(1))
            loss[step] = float(m.group(3))
            if m.group(6):  # tok/s is the run's average so far: its seconds are steps x batch / that
                seconds[step] = step * batch / int(m.group(6))
            elif m.group(4):
                seconds[step] = float(m.group(4)) / (1000 if m.group(5) == "ms" else 1 / 60)
    if not loss:
        raise SystemExit(f"{path}: no train_loss lines (did the reference run?)")
    text = path.read_text(errors="replace")
    post = {name: float(m.group(1)) for name, rx in REF_POST.items() if (m := rx.search(text))}
    return {"loss": loss, "seconds": seconds, "val_bpb": val, "post_quant": post_quant(post),
            "post_ema_val_bpb": post.get("pre_quant_val_bpb")}


def post_quant(found: dict) -> dict | None:
    """artifact bytes, the EMA weights' and the quantized score, and the gap, when a run got that far."""
    if not {"val_bpb", "pre_quant_val_bpb"} <= found.keys():
        return None
    out = {k: found.get(k) for k in ("artifact_bytes", "pre_quant_val_bpb", "val_bpb")}
    out["gap_bpb"] = out["val_bpb"] - out["pre_quant_val_bpb"]
    return out


def read_golf(folder: Path) -> dict:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():  # a run stopped after STOP_AFTER steps: its live log
        metrics = folder / "metrics.live.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{folder}/metrics.jsonl is empty")
    val, post = None, {}
    for name in ("eval.json", "metrics.json"):
        if (folder / name).exists():
            ev = json.loads((folder / name).read_text())
            val = ev.get("pre_quant_val_bpb", val)
            post.update({k: ev[k] for k in ("val_bpb", "pre_quant_val_bpb") if ev.get(k) is not None})
    if (folder / "size.json").exists():  # quantize's (parity.sh copies it)
        post["artifact_bytes"] = json.loads((folder / "size.json").read_text())["artifact_bytes"]
    model = {}
    if (folder / "train.json").exists():
        model = json.loads((folder / "train.json").read_text()).get("model_config") or {}
    return {"loss": {r["step"]: r["loss"] for r in rows}, "seconds": {r["step"]: r["elapsed_s"] for r in rows},
            "val_bpb": val, "loop_step": next((r["step"] for r in rows if r.get("recurrence")), None),
            "post_quant": post_quant(post),
            # parity.sh names a POSTQUANT run's folder ..._postquant[_isolated]: its pre-quant score is the EMA's;
            # an ISOLATE=1 folder ends in _isolated (a STOP_AFTER run's folder has no train.json to say so)
            "averaged": "_postquant" in folder.name,
            "isolated": bool(model.get("doc_isolation")) or folder.name.endswith("_isolated")}


def throughput(seconds: dict, lo: int, hi: int, batch: int) -> float | None:
    """Tokens per second over steps lo+1..hi, from the cumulative training clock."""
    if lo in seconds and hi in seconds and seconds[hi] > seconds[lo]:
        return (hi - lo) * batch / (seconds[hi] - seconds[lo])
    return None


def compare(which: str, refs: list[dict], golf: dict, isolated: dict | None, postquant: dict | None = None) -> dict:
    """postquant: golf's POSTQUANT run of the same schedule beside a raw-weights golf run (two runs, one training:
    the store serves the second's train stage from the first's)."""
    batch = BATCH[which]
    last = max(golf["loss"])
    steps = [s for s in sorted(set().union(*(r["loss"] for r in refs))) if s in golf["loss"]
             and all(s in r["loss"] for r in refs)]
    table = []
    for s in steps:
        ref_mean = statistics.mean(r["loss"][s] for r in refs)
        table.append({"step": s, "reference": [r["loss"][s] for r in refs], "reference_mean": ref_mean,
                      "golf": golf["loss"][s], "diff": golf["loss"][s] - ref_mean})
    banded = [row for row in table if row["step"] >= 10]
    diffs = [row["diff"] for row in banded]
    # golf's pre-quant score is its EMA weights' in a POSTQUANT run (folder ..._postquant): beside the reference's
    # post-EMA line; a raw-weights run's beside the reference's raw line (which a POSTQUANT reference log has too)
    averaged = golf.get("averaged", False)
    ref_vals = [r.get("post_ema_val_bpb") if averaged else r["val_bpb"] for r in refs]
    ref_vals = [v for v in ref_vals if v is not None]
    ref_val = statistics.mean(ref_vals) if ref_vals else None
    loop = golf.get("loop_step") or int(0.35 * last) + 1
    # before the loop: steps 10..(loop - 1) rounded to the logged tens; during: the next logged step to the end
    before = (10, (loop - 1) // 10 * 10)
    during = ((loop + 9) // 10 * 10, last)
    speed = {}
    for name, run in (("reference", refs[0]), ("golf", golf), ("golf_isolated", isolated)):
        if run is None:
            continue
        speed[name] = {"before_loop": throughput(run["seconds"], *before, batch),
                       "in_loop": throughput(run["seconds"], during[0], min(during[1], max(run["seconds"])), batch)}
    out = {
        "which": which, "steps": last, "table": table, "reference_seeds": len(refs),
        "max_abs_diff_from_10": max(map(abs, diffs)) if diffs else None,
        "mean_diff_from_10": statistics.mean(diffs) if diffs else None,
        "reference_spread_max": max((max(r["reference"]) - min(r["reference"]) for r in banded), default=0.0),
        "val_bpb": {"reference": ref_val, "reference_seeds": ref_vals, "golf": golf["val_bpb"]},
        "throughput_windows": {"before_loop": before, "in_loop": during}, "throughput": speed,
    }
    out["val_bpb"]["weights"] = "averaged (EMA)" if averaged else "raw"
    # post-quantization rows: the references' that got through GPTQ, golf's from a POSTQUANT (averaged) run only:
    # a raw-weights run's RTN "gap" is not a comparison
    pq = postquant or (golf if averaged else None)
    runs = [(f"reference {i + 1}", r) for i, r in enumerate(refs)] + [("golf", pq)]
    runs.append(("golf_isolated", isolated if isolated and isolated.get("averaged") else None))
    rows = {name: run["post_quant"] for name, run in runs if run is not None and run.get("post_quant")}
    if rows:
        out["post_quant"] = rows
    if postquant is not None:  # the EMA weights' scores of both sides, beside the raw ones above
        ema = [r.get("post_ema_val_bpb") for r in refs if r.get("post_ema_val_bpb") is not None]
        out["val_bpb_averaged"] = {"reference": statistics.mean(ema) if ema else None, "golf": postquant["val_bpb"]}
    out["within_band"] = bool(diffs) and out["max_abs_diff_from_10"] <= BAND and abs(out["mean_diff_from_10"]) < MEAN_BAND
    # golf isolating documents trains on another task than the reference's dense rows (FA3 is not on the image):
    # its curve is shown, but the band is for golf's dense-rows run (parity.sh without ISOLATE)
    out["golf_isolated"] = golf.get("isolated", False)
    if out["golf_isolated"]:
        out["within_band"] = None
    if ref_val is not None and golf["val_bpb"] is not None:
        out["val_bpb"]["diff"] = golf["val_bpb"] - ref_val
        out["val_bpb_within_band"] = abs(out["val_bpb"]["diff"]) <= BPB_BAND
    return out


def markdown(res: dict) -> str:
    n = res["reference_seeds"]
    head = "| step | " + " | ".join(f"reference {i + 1}" for i in range(n)) + " | reference mean | golf | golf - mean |"
    lines = [head, "|" + "---:|" * (n + 4)]
    for row in res["table"]:
        if row["step"] <= 5 or row["step"] % 10 == 0:
            refs = " | ".join(f"{v:.4f}" for v in row["reference"])
            lines.append(f"| {row['step']} | {refs} | {row['reference_mean']:.4f} | {row['golf']:.4f} | {row['diff']:+.4f} |")
    v = res["val_bpb"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines += ["", f"Steps 10-{res['steps']}: max |golf - mean| {res['max_abs_diff_from_10']:.4f} (band {BAND}), "
                  f"mean difference {res['mean_diff_from_10']:+.4f} (band {MEAN_BAND}); reference seeds differ by at "
                  f"most {res['reference_spread_max']:.4f}. " + (
                  "**Not banded: golf isolated documents, the reference attends across them** (the band is for "
                  "golf's dense-rows run)." if res.get("golf_isolated") else
                  f"**{'Within' if res['within_band'] else 'Outside'} the band.**"),
              f"val_bpb at step {res['steps']} ({v.get('weights', 'raw')} weights): reference {fmt(v['reference'])}, golf {fmt(v['golf'])}"
              + (f" (difference {v['diff']:+.4f}, band {BPB_BAND})" if "diff" in v else "")]
    if a := res.get("val_bpb_averaged"):
        lines.append(f"val_bpb at step {res['steps']} (averaged (EMA) weights): reference {fmt(a['reference'])}, "
                     f"golf {fmt(a['golf'])}")
    w = res["throughput_windows"]
    if res.get("shared_gpu"):
        lines += ["", "tokens/s: not shown, the runs shared the GPU."]
    else:
        lines += ["", "| tokens/s | before the loop (steps %d-%d) | in the loop (steps %d-%d) |" % (*w["before_loop"], *w["in_loop"]),
                  "|---|---:|---:|"]
    for name, s in res["throughput"].items():
        cells = [f"{x / 1e3:,.0f}K" if x else "n/a" for x in (s["before_loop"], s["in_loop"])]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    if res.get("post_quant"):
        lines += ["", "| after quantization | artifact bytes | pre-quant val_bpb (averaged weights) | quantized val_bpb | gap |",
                  "|---|---:|---:|---:|---:|"]
        for name, q in res["post_quant"].items():
            size = f"{q['artifact_bytes']:,.0f}" if q.get("artifact_bytes") else "n/a"
            lines.append(f"| {name} | {size} | {q['pre_quant_val_bpb']:.4f} | {q['val_bpb']:.4f} | {q['gap_bpb']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, refs: list[dict], golf: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for i, r in enumerate(refs):
        s = sorted(r["loss"])
        top.plot(s, [r["loss"][k] for k in s], color="grey", alpha=0.7, label=f"reference {i + 1}")
    s = sorted(golf["loss"])
    top.plot(s, [golf["loss"][k] for k in s], color="tab:blue", lw=1, label="golf")
    top.set_ylabel("train loss (nats)")
    top.set_ylim(top=min(10, top.get_ylim()[1]))
    top.legend()
    top.set_title(f"{res['which']}: golf vs the reference, same GPU, data and steps")
    rows = [r for r in res["table"] if r["step"] >= 10]
    bottom.axhspan(-BAND, BAND, color="tab:green", alpha=0.15, label=f"±{BAND} band")
    bottom.plot([r["step"] for r in rows], [r["diff"] for r in rows], "o-", color="tab:blue", ms=3)
    bottom.axhline(0, color="black", lw=0.5)
    bottom.set_ylabel("golf - ref mean")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", choices=sorted(BATCH), required=True)
    ap.add_argument("--ref", action="append", type=Path, required=True, help="a reference log (repeat per seed)")
    ap.add_argument("--golf", type=Path, required=True, help="golf's run folder from parity.sh")
    ap.add_argument("--golf-isolated", type=Path, help="golf with documents isolated (throughput only)")
    ap.add_argument("--golf-postquant", type=Path,
                    help="golf's POSTQUANT run of the --golf run's training: its EMA score, artifact and gap")
    ap.add_argument("--shared-gpu", action="store_true",
                    help="the runs shared the GPU (bench/sitting_queue.sh's A+B): their tokens/s are left out")
    ap.add_argument("--out", type=Path, required=True, help="path prefix: writes .md, .json, .png")
    args = ap.parse_args(argv)
    batch = BATCH[args.which]
    refs = [read_reference(p, batch) for p in args.ref]
    golf = read_golf(args.golf)
    isolated = read_golf(args.golf_isolated) if args.golf_isolated else None
    postquant = read_golf(args.golf_postquant) if args.golf_postquant else None
    if postquant:
        if not postquant["averaged"] or golf["averaged"]:
            raise SystemExit(f"--golf-postquant takes parity.sh's POSTQUANT folder (..._postquant) and --golf the "
                             f"raw-weights one: got {args.golf_postquant.name} and {args.golf.name}")
        if postquant["loss"] != golf["loss"]:
            raise SystemExit(f"{args.golf_postquant} trained otherwise than {args.golf}: not the same run's training")
    res = compare(args.which, refs, golf, isolated, postquant)
    if args.shared_gpu:
        res["throughput"], res["shared_gpu"] = {}, True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(res))
    plot(res, refs, golf, Path(f"{args.out}.png"))
    print(markdown(res))
    return 0 if res["within_band"] or res["within_band"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
