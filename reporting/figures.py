"""The report's plots, each a function of the runs (reporting.data.RunData) returning PNG bytes, or None when no
run has the data. Figures are built without pyplot: pyplot keeps global state, and stages may run in threads
of one process (the quantize sweep), so each figure is its own object with its own Agg canvas."""

from __future__ import annotations

import io
import re
from typing import Sequence

from .data import RunData

DPI = 100
CAP_BYTES = 16_000_000      # the challenge's artifact cap (a run's size.json says its own)
EVAL_BUDGET_S = 600.0       # the challenge's eval limit (a run's eval.json says its own)
GROUP_COLORS = {"embed": "tab:purple", "attn": "tab:blue", "mlp": "tab:green", "float": "tab:gray",
                "code": "tab:red", "framing": "black"}


def _figure(w: float, h: float, rows: int = 1, cols: int = 1, left: float = 0.8, right: float = 0.25,
            bottom: float = 0.6, top: float = 0.35, wspace: float = 0.3, hspace: float = 0.55):
    """A figure of w x h inches with margins in inches. Fixed margins, not constrained layout: that draws every
    figure twice, and the page must come in seconds (half its time was layout)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, wspace=wspace,
                        hspace=hspace)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def color(i: int) -> str:
    """The run's colour: the same in every plot of the page."""
    return f"C{i % 10}"


def _mark_steps(ax, run: RunData, i: int, x_of_step) -> None:
    """Dashed line where the recurrence started, dotted where the warmdown did (when the run recorded them)."""
    marks = run.train["marks"]
    for key, style in (("recurrence_step", "--"), ("warmdown_step", ":")):
        step = marks.get(key)
        if step is not None:
            ax.axvline(x_of_step(step), color=color(i), ls=style, lw=1, alpha=0.8)


def training_figure(runs: Sequence[RunData]) -> bytes | None:
    """Loss against step and against wallclock, the LR multiplier and tokens/s; held-out and val points at
    the last step; the recurrence (dashed) and warmdown (dotted) starts."""
    if not any(r.train for r in runs):
        return None
    fig, ax = _figure(9, 6.2, 2, 2, wspace=0.28, hspace=0.45)
    for i, run in enumerate(runs):
        if not run.train:
            continue
        rec = run.train["records"]
        steps = [r["step"] for r in rec]
        elapsed = {r["step"]: r.get("elapsed_s", 0.0) for r in rec}
        ax[0, 0].plot(steps, [r["loss"] for r in rec], color=color(i), lw=1.2, label=run.label)
        ax[0, 1].plot([elapsed[s] for s in steps], [r["loss"] for r in rec], color=color(i), lw=1.2)
        ax[1, 0].plot(steps, [r["lr_mult"] for r in rec], color=color(i), lw=1.2)
        ax[1, 1].plot(steps, [r["tokens_per_s"] for r in rec], color=color(i), lw=1.0)
        for a in (ax[0, 0], ax[1, 0], ax[1, 1]):
            _mark_steps(a, run, i, lambda s: s)
        _mark_steps(ax[0, 1], run, i, lambda s: elapsed.get(s, 0.0))
        last = steps[-1] if steps else 0
        held = (run.average or {}).get("report") or {}
        for name, loss in (held.get("heldout_loss") or {}).items():
            ax[0, 0].plot([last], [loss], marker={"final": "o", "ema": "s", "swa": "^"}.get(name, "x"),
                          color=color(i), ms=6, mfc="white", ls="none")
        if run.eval:
            ax[0, 0].plot([last], [run.eval["result"]["val_loss"]], marker="*", color=color(i), ms=11, ls="none")
    ax[0, 0].set(xlabel="step", ylabel="train loss (nats/token)",
                 title="loss by step (o/s/^ held-out final/EMA/SWA, * val)")
    ax[0, 1].set(xlabel="training wallclock (s)", ylabel="train loss (nats/token)", title="loss by wallclock")
    ax[1, 0].set(xlabel="step", ylabel="LR multiplier", title="schedule (-- recurrence, : warmdown)")
    ax[1, 1].set(xlabel="step", ylabel="tokens/s", title="throughput")
    if len(runs) > 1:
        ax[0, 0].legend(fontsize=8)
    return _png(fig)


def averaging_figure(runs: Sequence[RunData]) -> bytes | None:
    """The candidates' held-out losses, one bar per run for each candidate; the chosen one outlined."""
    have = [(i, r) for i, r in enumerate(runs) if r.average and r.average.get("report")]
    if not have:
        return None
    names = [n for n in ("final", "ema", "swa") if any(n in r.average["report"]["heldout_loss"] for _, r in have)]
    fig, axes = _figure(7, 3.8)
    ax, width = axes[0, 0], 0.8 / len(have)
    values = []
    for j, (i, run) in enumerate(have):
        rep = run.average["report"]
        for k, name in enumerate(names):
            if name in rep["heldout_loss"]:
                v = rep["heldout_loss"][name]
                values.append(v)
                chosen = name == rep.get("chosen")
                ax.bar(k + (j - (len(have) - 1) / 2) * width, v, width * 0.9, color=color(i),
                       edgecolor="black" if chosen else "none", linewidth=2 if chosen else 0,
                       label=run.label if k == 0 else None)
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.15 * (hi - lo or 1.0), hi + 0.1 * (hi - lo or 1.0))
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="held-out loss (nats/token)", title="averaging candidates (outlined: chosen)")
    if len(have) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def _group_of(section: str) -> str:
    return section.split(":")[0]


def _sections(size: dict) -> list[tuple[str, int]]:
    """(name, bytes) of the artifact's parts: each compressed (group, dtype) section, the blob's own framing (what
    weights.bin holds beyond its sections: header, section table), then the shipped code; they sum to the artifact."""
    parts = [(s["section"], int(s["bytes"])) for s in size.get("sections", [])]
    framing = int(size.get("weights_bytes", 0)) - sum(n for _, n in parts)
    if framing > 0:
        parts.append(("framing", framing))
    return parts + [("code", int(size["code_bytes"]))]


def _mb(ax, axis: str = "y") -> None:
    """Byte axes in MB (decimal, as the cap is stated): 16,000,000 reads as 16 MB, not 1.6e7."""
    from matplotlib.ticker import FuncFormatter
    fmt = FuncFormatter(lambda v, _: f"{v / 1e6:g} MB" if v >= 1e5 or v == 0 else f"{v / 1e3:g} KB")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def quant_bytes_figure(runs: Sequence[RunData]) -> bytes | None:
    """Where the bytes go: one stacked column per run, a segment per compressor section plus the code, against
    the cap (left) and zoomed to the artifact (right: a tiny run is a sliver of 16 MB)."""
    have = [(i, r) for i, r in enumerate(runs) if r.quantize and r.quantize.get("size")]
    if not have:
        return None
    fig, ax = _figure(9, 5.0, 1, 2, right=1.25, wspace=0.3)
    cap = max(int(r.quantize["size"].get("cap_bytes", CAP_BYTES)) for _, r in have)
    handles = {}
    for col, (i, run) in enumerate(have):
        bottom = 0
        for name, n in _sections(run.quantize["size"]):
            shade = 0.5 if name.endswith((":f16", ":f32", ":float16", ":float32")) else 1.0
            for a in ax[0]:
                h = a.bar(col, n, 0.6, bottom=bottom, color=GROUP_COLORS.get(_group_of(name), "tab:olive"),
                          alpha=shade, edgecolor="white", linewidth=0.5)
            handles.setdefault(name, h)
            bottom += n
        ax[0, 1].annotate(f"{bottom:,}", (col, bottom), xytext=(0, 3), textcoords="offset points", ha="center",
                          fontsize=8)
    ax[0, 0].axhline(cap, color="black", lw=1.5)
    ax[0, 0].annotate(f"cap {cap:,}", (-0.4, cap), xytext=(0, -12), textcoords="offset points", fontsize=8)
    ax[0, 0].set_ylim(0, cap * 1.05)
    ax[0, 0].set_title("artifact against the cap")
    ax[0, 1].set_ylim(0, max(sum(n for _, n in _sections(r.quantize["size"])) for _, r in have) * 1.12)
    ax[0, 1].set_title("zoomed to the artifact")
    for a in ax[0]:
        a.set_xticks(range(len(have)), [r.label for _, r in have], rotation=20 if len(have) > 2 else 0, fontsize=8)
        a.set_xlim(-0.6, len(have) - 0.4)
        _mb(a)
    ax[0, 1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def _layer_of(tensor: str, num_layers: int) -> int:
    """The block index of a tensor's name; the embedding before block 0, others (skips, final norm) after."""
    m = re.search(r"blocks\.(\d+)\.", tensor)
    if m:
        return int(m.group(1))
    return -1 if tensor.startswith(("embed", "tok_emb")) else num_layers


def quant_error_figure(runs: Sequence[RunData]) -> bytes | None:
    """Each tensor's relative RMS error after quantization (size.json), by layer and tensor group: the marker
    says the group; the colour the group (one run) or the run (several)."""
    from matplotlib.lines import Line2D
    have = [(i, r) for i, r in enumerate(runs) if r.quantize and (r.quantize.get("size") or {}).get("tensors")]
    if not have:
        return None
    fig, axes = _figure(7.4, 3.8, right=1.9)
    ax = axes[0, 0]
    markers = {"embed": "D", "attn": "o", "mlp": "s", "float": "."}
    groups: dict[str, str] = {}
    for j, (i, run) in enumerate(have):
        tensors = run.quantize["size"]["tensors"]
        n_layers = 1 + max([_layer_of(t["tensor"], 0) for t in tensors] + [0])
        for t in tensors:
            if t.get("rel_rmse") is None:
                continue
            group = t.get("group", "?")
            c = GROUP_COLORS.get(group, "tab:olive") if len(have) == 1 else color(i)
            groups.setdefault(group, GROUP_COLORS.get(group, "tab:olive") if len(have) == 1 else "gray")
            x = _layer_of(t["tensor"], n_layers) + (j - (len(have) - 1) / 2) * 0.12
            ax.plot([x], [t["rel_rmse"]], marker=markers.get(group, "x"), color=c, ls="none", ms=5, alpha=0.8)
    handles = [Line2D([], [], marker=markers.get(g, "x"), color=c, ls="none", label=g) for g, c in groups.items()]
    if len(have) > 1:
        handles += [Line2D([], [], marker="o", color=color(i), ls="none", label=r.label) for i, r in have]
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    # 1, 2 and 5 of each decade labelled, short: matplotlib's minor labels (6x10^-3) ran into the axis label
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-")))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="layer (-1: embedding; last: outside the blocks)", ylabel="relative RMS error",
           title="per-tensor quantization error")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def bpb_stages(result: dict) -> list[tuple[str, float]]:
    """(label, val_bpb) of the model at each point of the way that eval.json recorded: before quantization,
    quantized (without TTT) and, with TTT, after it."""
    ttt = bool(result.get("ttt"))
    out = []
    if result.get("pre_quant_val_bpb") is not None:
        out.append(("pre-quant", result["pre_quant_val_bpb"]))
    quantized = result.get("no_ttt_val_bpb") if ttt else result.get("val_bpb")
    if quantized is not None:
        out.append(("quantized", quantized))
    if ttt:
        out.append(("after TTT", result["val_bpb"]))
    return out


def eval_figure(runs: Sequence[RunData]) -> bytes | None:
    """val_bpb before and after quantization and after TTT (left); the eval timer's seconds against the budget
    (right: decode, scoring, TTT stacked)."""
    have = [(i, r) for i, r in enumerate(runs) if r.eval]
    if not have:
        return None
    fig, ax = _figure(9, 3.6, 1, 2, wspace=0.55)
    labels = [n for n in ("pre-quant", "quantized", "after TTT")
              if any(n == m for _, r in have for m, _ in bpb_stages(r.eval["result"]))]
    width, values = 0.8 / len(have), []
    for j, (i, run) in enumerate(have):
        for name, v in bpb_stages(run.eval["result"]):
            values.append(v)
            x = labels.index(name) + (j - (len(have) - 1) / 2) * width
            ax[0, 0].bar(x, v, width * 0.9, color=color(i), label=run.label if name == "quantized" else None)
            if len(have) <= 3:
                ax[0, 0].annotate(f"{v:.4f}", (x, v), xytext=(0, 2), textcoords="offset points", ha="center",
                                  fontsize=7)
    if values:  # zoomed: the differences are in the third decimal; at least 0.01 bpb shown so noise looks small
        lo, hi = min(values), max(values)
        pad = max(0.25 * (hi - lo), 0.005)
        ax[0, 0].set_ylim(lo - pad, hi + pad)
    ax[0, 0].ticklabel_format(axis="y", useOffset=False)
    ax[0, 0].set_xticks(range(len(labels)), labels)
    ax[0, 0].set(ylabel="val_bpb", title="val_bpb along the way")
    budget = max(float(r.eval["result"].get("budget_seconds") or EVAL_BUDGET_S) for _, r in have)
    for row, (i, run) in enumerate(have):
        res, left = run.eval["result"], 0.0
        for name, key, c in (("decode", "load_seconds", "tab:gray"), ("scoring", "eval_seconds", "tab:blue"),
                             ("TTT", "ttt_seconds", "tab:orange")):
            v = float(res.get(key) or 0.0)
            ax[0, 1].barh(row, v, left=left, color=c, label=name if row == 0 else None)
            left += v
        ax[0, 1].annotate(f"{left:.1f} s", (left, row), xytext=(3, 0), textcoords="offset points", va="center",
                          fontsize=8)
    ax[0, 1].axvline(budget, color="black", lw=1.5)
    ax[0, 1].set_xlim(0, budget * 1.05)
    ax[0, 1].set_yticks(range(len(have)), [r.label for _, r in have], fontsize=7)
    ax[0, 1].invert_yaxis()
    ax[0, 1].set(xlabel="seconds", title=f"eval timer against the {budget:g} s budget")
    ax[0, 1].legend(fontsize=8, loc="upper right")
    return _png(fig)


def buckets_figure(runs: Sequence[RunData]) -> bytes | None:
    """BPB by document-length bucket, one line per run."""
    have = [(i, r) for i, r in enumerate(runs) if r.eval and r.eval.get("buckets")]
    if not have:
        return None
    fig, axes = _figure(7, 3.4)
    ax = axes[0, 0]
    order = [b["bucket"] for _, r in have for b in r.eval["buckets"]]
    order = list(dict.fromkeys(sorted(order, key=lambda s: int(re.match(r"\d+", s).group()))))
    for i, run in have:
        bs = run.eval["buckets"]
        ax.plot([order.index(b["bucket"]) for b in bs], [b["bpb"] for b in bs], marker="o", color=color(i),
                label=run.label)
    ax.set_xticks(range(len(order)), order)
    ax.set(xlabel="document length (tokens)", ylabel="val_bpb", title="BPB by document length")
    if len(have) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def ttt_figure(runs: Sequence[RunData]) -> bytes | None:
    """The cumulative TTT gain over the val stream (bpb without TTT minus with it, so far)."""
    have = [(i, r) for i, r in enumerate(runs) if r.eval and r.eval.get("ttt")]
    if not have:
        return None
    fig, axes = _figure(7, 3.4)
    ax = axes[0, 0]
    for i, run in have:
        ax.plot(run.eval["ttt"]["targets"], run.eval["ttt"]["gain_bpb"], color=color(i), label=run.label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="val targets scored", ylabel="bpb gained by TTT so far", title="cumulative TTT gain")
    if len(have) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def seeds_figure(values: Sequence[tuple[str, float]], baseline: Sequence[tuple[str, float]] = ()) -> bytes | None:
    """Each seed's val_bpb, the mean and one standard deviation; the baseline's seeds beside them."""
    if not values:
        return None
    import statistics
    fig, axes = _figure(6, 3.2)
    ax = axes[0, 0]
    for x, (name, vals) in enumerate((("runs", values), ("baseline", baseline))):
        if not vals:
            continue
        ys = [v for _, v in vals]
        ax.plot([x] * len(ys), ys, "o", color="C0" if x == 0 else "tab:gray", ms=7, alpha=0.8)
        m = statistics.fmean(ys)
        s = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar([x + 0.15], [m], yerr=[s], fmt="_", ms=18, color="black", capsize=4)
        for lab, y in vals:
            ax.annotate(lab, (x, y), xytext=(-8, 0), textcoords="offset points", ha="right", va="center", fontsize=7)
    ax.set_xticks([0, 1] if baseline else [0], ["runs", "baseline"] if baseline else ["runs"])
    ax.set_xlim(-0.8, 1.6 if baseline else 0.8)
    ax.set(ylabel="val_bpb", title="val_bpb per seed (bar: mean +- std)")
    return _png(fig)
