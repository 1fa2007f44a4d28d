"""The six sections of the report, each from the runs' data (reporting.data); a part no run has says so."""

from __future__ import annotations

import statistics
from typing import Sequence

from . import figures as F
from .data import RunData
from .page import Block, Section, esc, fmt, run_table, table


def training_section(runs: Sequence[RunData]) -> Section:
    s = Section("training", "Training")
    if not any(r.train for r in runs):
        s.blocks.append(Block(missing="no train artifact in these runs' lineage"))
        return s
    marks = lambda r: r.train["marks"]  # noqa: E731
    median = lambda r: r.train["summary"]["median_tokens_per_s_by_recurrence"]  # noqa: E731
    numbers = run_table(runs, [
        ("train key", lambda r: r.keys["train"][:20]),
        ("seed", lambda r: str(r.seed)),
        ("steps", lambda r: r.train["summary"]["steps"]),
        ("stopped by", lambda r: r.train["summary"]["stop_reason"]),
        ("training seconds", lambda r: r.train["summary"]["train_seconds"]),
        ("final train loss", lambda r: r.train["summary"]["final_train_loss"]),
        ("tokens/s (mean after step 5)", lambda r: r.train["summary"]["tokens_per_s"]),
        ("tokens/s, median without recurrence", lambda r: median(r)["without"]),
        ("tokens/s, median with recurrence", lambda r: median(r)["with"]),
        ("recurrence from step", lambda r: marks(r)["recurrence_step"] or "never"),
        ("warmdown from step", lambda r: marks(r)["warmdown_step"] or "never"),
        ("parameters", lambda r: r.train["summary"]["params"]),
        ("processes x device", lambda r: f"{r.train['summary']['world_size']} x {r.train['summary']['device']}"),
    ])
    s.blocks.append(Block(F.training_figure(runs), "training curves", numbers))
    s.intro = ("Per-step records of metrics.jsonl. Held-out points: the average stage's candidates on held-out "
               "training tokens; val point: the eval stage's val_loss of the quantized model.")
    return s


def averaging_section(runs: Sequence[RunData]) -> Section:
    s = Section("averaging", "Averaging")
    if not any(r.average and r.average.get("report") for r in runs):
        s.blocks.append(Block(missing="no average artifact in these runs' lineage"))
        return s
    rep = lambda r: r.average["report"]  # noqa: E731
    numbers = run_table(runs, [
        ("chosen", lambda r: rep(r)["chosen"]),
        ("held-out loss, final", lambda r: rep(r)["heldout_loss"]["final"]),
        ("held-out loss, EMA", lambda r: rep(r)["heldout_loss"]["ema"]),
        ("held-out loss, SWA", lambda r: rep(r)["heldout_loss"]["swa"]),
        ("SWA members", lambda r: len(rep(r)["swa_members"])),
        ("held-out tokens", lambda r: rep(r)["heldout_tokens"]),
        ("held-out may overlap training", lambda r: rep(r)["heldout_may_overlap_training"]),
        ("selection seconds", lambda r: r.average["metrics"].get("selection_seconds")),
    ])
    s.blocks.append(Block(F.averaging_figure(runs), "averaging candidates", numbers))
    return s


def _sections_table(runs: Sequence[RunData]) -> str:
    """Bytes of each compressor section (and the code), one column per run."""
    have = [r for r in runs if r.quantize and r.quantize.get("size")]
    names = list(dict.fromkeys(n for r in have for n, _ in F._sections(r.quantize["size"])))
    comp = {r.label: {s["section"]: s.get("compressor", "") for s in r.quantize["size"].get("sections", [])}
            for r in have}
    rows = []
    for n in names:
        per = [dict(F._sections(r.quantize["size"])).get(n) for r in have]
        rows.append([n, ", ".join(sorted({comp[r.label].get(n, "") for r in have} - {""})) or "–", *per])
    return table(["section", "compressor", *[r.label for r in have]], rows)


def _candidates_block(runs: Sequence[RunData]) -> Block:
    """The cap fit's candidate table (quantize.mode=fit), the first run that has one."""
    for r in runs:
        cand = r.quantize and r.quantize.get("candidates")
        if not cand:
            continue
        groups = [g for g in cand.get("chosen", {})]
        rows = [[*[c.get(g, "") for g in groups], c.get("artifact_bytes"), c.get("fits"), c.get("predicted_delta_loss"),
                 c.get("measured_delta_loss"), c.get("val_bpb"), ("html", "<b>chosen</b>") if c.get("chosen") else ""]
                for c in cand.get("candidates", [])]
        head = (f"{r.label}: target {fmt(cand.get('target_bytes'))} bytes = cap {fmt(cand.get('cap_bytes'))} - margin "
                f"{fmt(cand.get('margin_bytes'))}; {fmt(cand.get('combinations'))} combinations, "
                f"{fmt(cand.get('fitting'))} fit; quality: {cand.get('quality', '')}")
        t = table([*groups, "artifact bytes", "fits", "predicted Δloss", "measured Δloss", "val_bpb", ""], rows)
        return Block(numbers=f"<p>{esc(head)}</p>{t}", title="cap-fit candidates")
    return Block(title="cap-fit candidates",
                 missing="no cap fit in these runs (quantize.mode=fixed: no candidates.json)")


def quantization_section(runs: Sequence[RunData]) -> Section:
    s = Section("quantization", "Quantization")
    if not any(r.quantize for r in runs):
        s.blocks.append(Block(missing="no quantize artifact in these runs' lineage (a train key stops at training)"))
        return s
    size = lambda r: r.quantize["size"]  # noqa: E731
    numbers = run_table(runs, [
        ("artifact bytes", lambda r: size(r)["artifact_bytes"]),
        ("weights bytes", lambda r: size(r)["weights_bytes"]),
        ("code bytes", lambda r: size(r)["code_bytes"]),
        ("cap", lambda r: size(r)["cap_bytes"]),
        ("margin", lambda r: size(r)["margin_bytes"]),
        ("fits", lambda r: r.quantize["metrics"]["fits"]),
        ("method", lambda r: size(r)["method"]),
        ("scheme", lambda r: r.quantize["metrics"]["scheme"]),
    ]) + "<h3>bytes per compressor section</h3>" + _sections_table(runs)
    s.blocks.append(Block(F.quant_bytes_figure(runs), "artifact bytes by section", numbers))
    groups = sorted({k[len("quant_rel_rmse_"):] for r in runs if r.quantize for k in r.quantize["metrics"]
                     if k.startswith("quant_rel_rmse_")})
    err = run_table(runs, [("relative RMS error, all", lambda r: r.quantize["metrics"]["quant_rel_rmse"])] +
                    [(f"relative RMS error, {g}", lambda r, g=g: r.quantize["metrics"][f"quant_rel_rmse_{g}"])
                     for g in groups])
    s.blocks.append(Block(F.quant_error_figure(runs), "per-tensor relative error", err,
                          missing="" if any((r.quantize or {}).get("size") for r in runs) else "no size.json"))
    s.blocks.append(_candidates_block(runs))
    return s


def _ttt_block(runs: Sequence[RunData]) -> Block:
    png = F.ttt_figure(runs)
    gains = run_table(runs, [("TTT", lambda r: r.eval["result"].get("ttt") or "none"),
                             ("TTT gain, bpb (eval.json)", lambda r: -r.eval["result"]["ttt_gain_bpb"]),
                             ("TTT gain, bpb (end of curve)", lambda r: r.eval["ttt"]["final_gain_bpb"])])
    if png:
        return Block(png, "cumulative TTT gain", gains, title="TTT gain over the val stream")
    if not any(r.eval and r.eval["result"].get("ttt") for r in runs):
        why = "no test-time training in these runs (eval.ttt.method=none)"
    else:
        why = ("the eval artifact holds no running no-TTT score (nll_no_ttt_cumsum.npy: written when "
               "eval.no_ttt_diagnostic=true), so the gain along the stream is not known")
    return Block(numbers=gains, missing=why, title="TTT gain over the val stream")


def _buckets_block(runs: Sequence[RunData]) -> Block:
    png = F.buckets_figure(runs)
    have = [r for r in runs if r.eval and r.eval.get("buckets")]
    if not png:
        return Block(missing="no per-token NLLs or document boundaries (token_nll.npy, the val shards and their "
                             "byte sidecar)", title="BPB by document length")
    order = list(dict.fromkeys(b["bucket"] for r in have for b in r.eval["buckets"]))
    first = {b["bucket"]: b for b in have[0].eval["buckets"]}
    rows = [[k, first.get(k, {}).get("docs"), first.get(k, {}).get("targets"),
             *[{b["bucket"]: b["bpb"] for b in r.eval["buckets"]}.get(k) for r in have]] for k in order]
    t = table(["tokens", f"docs ({have[0].label})", "targets", *[f"bpb {r.label}" for r in have]], rows)
    return Block(png, "BPB by document length", t, title="BPB by document length")


def eval_section(runs: Sequence[RunData]) -> Section:
    s = Section("eval", "Eval")
    if not any(r.eval for r in runs):
        s.blocks.append(Block(missing="no eval artifact in these runs' lineage"))
        return s
    res = lambda r: r.eval["result"]  # noqa: E731
    numbers = run_table(runs, [
        ("val_bpb", lambda r: res(r)["val_bpb"]),
        ("val_loss (nats/token)", lambda r: res(r)["val_loss"]),
        ("pre-quant val_bpb", lambda r: res(r)["pre_quant_val_bpb"]),
        ("quantization gap, bpb", lambda r: res(r)["quant_gap_bpb"]),
        ("without TTT val_bpb", lambda r: res(r)["no_ttt_val_bpb"]),
        ("val tokens", lambda r: res(r)["val_tokens"]),
        ("val bytes", lambda r: res(r)["val_bytes"]),
        ("decode seconds", lambda r: res(r)["load_seconds"]),
        ("scoring seconds", lambda r: res(r)["eval_seconds"]),
        ("TTT seconds", lambda r: res(r).get("ttt_seconds", 0.0)),
        ("timer total / budget", lambda r: f"{res(r)['total_eval_seconds']:.1f} / {res(r)['budget_seconds']:g} s"),
        ("seq_len / stride", lambda r: f"{res(r)['seq_len']} / {res(r)['stride']}"),
        ("documents isolated", lambda r: res(r)["doc_isolation"]),
        ("processes x device", lambda r: f"{res(r)['world_size']} x {res(r)['device']}"),
    ])
    s.blocks.append(Block(F.eval_figure(runs), "val_bpb and eval seconds", numbers))
    s.blocks.append(_buckets_block(runs))
    s.blocks.append(_ttt_block(runs))
    return s


def _status(v) -> tuple:
    return ("html", f'<span class="{esc(v)}">{esc(v)}</span>') if v else "–"


def compliance_section(runs: Sequence[RunData]) -> Section:
    s = Section("compliance", "Compliance")
    have = [r for r in runs if r.compliance]
    if not have:
        s.blocks.append(Block(missing="no compliance artifact in these runs' lineage (give a compliance key)"))
        return s
    names = list(dict.fromkeys(c["check"] for r in have for c in r.compliance["checks"]))
    status = [{c["check"]: c["status"] for c in r.compliance["checks"]} for r in have]
    head = ["check", *[r.label for r in have], f"evidence ({have[0].label})"]
    evidence = {c["check"]: c["evidence"] + (f" — {c['warning']}" if c.get("warning") else "")
                for c in have[0].compliance["checks"]}
    rows = [["verdict", *[_status(r.compliance.get("verdict")) for r in have], ""]]
    rows += [[n, *[_status(st.get(n)) for st in status], evidence.get(n, "")] for n in names]
    classes = ["", *[""] * len(have), "evidence"]
    more = "".join(f"<details><summary>evidence of {esc(r.label)}</summary>"
                   + table(["check", "status", "evidence"], [[c["check"], _status(c["status"]), c["evidence"]]
                                                            for c in r.compliance["checks"]], ["", "", "evidence"])
                   + "</details>" for r in have[1:])
    s.blocks.append(Block(numbers=table(head, rows, classes) + more))
    return s


def _seed_rows(runs: Sequence[RunData]) -> list[list]:
    return [[r.label, str(r.seed) if r.seed is not None else None,
             (r.keys.get("compliance") or r.keys.get("eval") or r.keys.get("train", ""))[:24],
             r.eval["result"]["val_bpb"] if r.eval else None, r.eval["result"]["val_loss"] if r.eval else None,
             r.quantize["size"]["artifact_bytes"] if r.quantize and r.quantize.get("size") else None,
             r.train["summary"]["final_train_loss"] if r.train else None,
             r.train["summary"]["train_seconds"] if r.train else None,
             (r.compliance or {}).get("verdict")] for r in runs]


def _spread(runs: Sequence[RunData]) -> str:
    """Mean and sample std (n - 1, as golf compare's) of val_bpb, val_loss and the final train loss."""
    cols = [("val_bpb", [r.eval["result"]["val_bpb"] for r in runs if r.eval]),
            ("val_loss", [r.eval["result"]["val_loss"] for r in runs if r.eval]),
            ("final train loss", [r.train["summary"]["final_train_loss"] for r in runs if r.train])]
    rows = [[name, len(v), statistics.fmean(v) if v else None, statistics.stdev(v) if len(v) > 1 else None,
             (max(v) - min(v)) if len(v) > 1 else None] for name, v in cols]
    return table(["", "runs", "mean", "std", "max - min"], rows)


def seeds_section(runs: Sequence[RunData], comparison: dict | None = None) -> Section:
    """The per-seed table, mean and std; with a comparison (golf report --against), the Welch test."""
    s = Section("seeds", "Seeds")
    t = table(["run", "seed", "key", "val_bpb", "val_loss", "artifact bytes", "final train loss", "train s", "verdict"],
              _seed_rows(runs))
    s.blocks.append(Block(numbers=t))
    numbers = _spread(runs)
    if comparison and comparison.get("text"):
        numbers += f"<h3>Welch test against the baseline</h3><pre>{esc(comparison['text'])}</pre>"
    elif comparison and comparison.get("error"):
        numbers += f'<p class="missing">{esc(comparison["error"])}</p>'
    vals = [(r.label, r.eval["result"]["val_bpb"]) for r in runs if r.eval]
    png = F.seeds_figure(vals, (comparison or {}).get("baseline", ()))
    note = "" if len(runs) > 1 else ("one run: give several keys (golf report KEY1 KEY2 KEY3) for the seeds' "
                                     "spread, and --against KEY,KEY,... for the Welch test")
    s.blocks.append(Block(png, "val_bpb per seed", numbers,
                          missing=note or ("" if png else "no eval artifact in these runs: no val_bpb per seed")))
    return s
