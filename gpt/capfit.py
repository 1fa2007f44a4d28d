"""Cap fit: the best predicted quality whose exact artifact bytes fit under the cap minus a margin.

Every group option (bit width x clip rule, for the embedding, attention and MLP groups separately) is
quantized once, its sections compressed (with the compressor each section of that group prefers), and
scored: relative weight error and, with a held-out slice of *training* tokens, the loss increase when
only that group is quantized. A combination's bytes are the sum of its groups' sections plus the
float tensors, the header and the code; its predicted loss increase is the sum of its groups'
increases (quantization errors of different groups add up nearly independently at this size). The
best few fitting combinations are then built whole (LQER included), their bytes measured exactly and
their held-out loss measured; the best measured wins. Validation data never takes part in the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gptq import parse_clip, sort_rows, weight_error
from .qpack import SectionCache, assemble, available_compressors, layout, pack_sections
from .quant import dequantize_entry

MAX_TABLE_ROWS = 40


class CapFitError(ValueError):
    """No candidate of the grid fits the target."""


@dataclass(frozen=True)
class GroupScheme:
    """One tensor group's quantization: bit width and clip rule."""
    bits: int
    clip: str

    def label(self) -> str:
        return f"int{self.bits} {self.clip}"


def pack_options(cfg) -> tuple[list[str], bool | None]:
    methods = available_compressors() if cfg.compressor == "best" else [cfg.compressor]
    return methods, {"off": False, "on": True, "try": None}[cfg.shuffle]


@dataclass
class Option:
    scheme: object          # GroupScheme
    bytes: int              # compressed bytes of the group's sections
    sq_err: float
    sq_ref: float
    delta: float            # held-out loss increase with only this group quantized (or the proxy)
    index: dict
    packed: dict


@dataclass
class FitResult:
    chosen: dict
    report: dict
    markdown: str


def parse_list(text: str, kind, field: str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise CapFitError(f"quantize.{field} is empty")
    try:
        return [kind(s) for s in items]
    except ValueError:
        raise CapFitError(f"quantize.{field}: cannot read {text!r} as a list of {kind.__name__}") from None


def fit(quantizer, cfg, code_bytes: int, meta: dict, cache: SectionCache, scorer, val) -> FitResult:
    target = cfg.cap_bytes - cfg.fit_margin_bytes
    bits = parse_list(cfg.fit_bits, int, "fit_bits")
    clips = parse_list(cfg.fit_clips, str, "fit_clips")
    for b in bits:
        if not 2 <= b <= 8:
            raise CapFitError(f"quantize.fit_bits: {b} is not in 2..8")
    for c in clips:
        parse_clip(c)
    options = [GroupScheme(b, c) for b in bits for c in clips]
    methods, shuffle = pack_options(cfg)
    state = quantizer.state
    base_loss = scorer(state) if scorer else None

    float_lay = layout(quantizer.floats, {n: "float" for n in quantizer.floats})
    float_packed = pack_sections(float_lay, cache, methods, shuffle)
    groups = quantizer.present

    def group_layout(g, scheme):
        ent = quantizer.group(g, scheme)
        if cfg.row_order == "scale":
            ent = {n: sort_rows(t) for n, t in ent.items()}
        return ent, layout(ent, {n: g for n in ent})

    per_group: dict[str, list[Option]] = {}
    for g in groups:
        # the compressor (and shuffle) each of this group's sections prefers, judged on a middle option
        _, ref_lay = group_layout(g, options[len(options) // 2])
        prefer = {k[1]: (p.method, p.width) for k, p in pack_sections(ref_lay, cache, methods, shuffle).items()}
        # quantize every option first, then compress them all at once in threads (the codecs release the GIL)
        built = [(scheme, *group_layout(g, scheme)) for scheme in options]
        jobs = [(bytes(raw), *prefer[k[1]]) for _, _, lay in built for k, raw in lay.raw.items()]
        cache.warm(jobs)
        per_group[g] = []
        for scheme, ent, lay in built:
            packed = {k: cache.get(bytes(raw), *prefer[k[1]]) for k, raw in lay.raw.items()}
            deq = {n: dequantize_entry(t) for n, t in ent.items()}
            errs = [weight_error(state[n], deq[n]) for n in ent]
            if scorer:
                delta = scorer({**state, **deq}) - base_loss
            else:  # no held-out tokens: the sum of squared relative output (or weight) errors
                delta = sum(quantizer.rel_output_error(n, t) ** 2 for n, t in ent.items())
            per_group[g].append(Option(scheme, sum(len(p.data) for p in packed.values()), sum(e for e, _ in errs),
                                       sum(r for _, r in errs), delta, lay.index, packed))

    def blob_bytes(combo: tuple[Option, ...]) -> int:
        index = {k: v for o in combo for k, v in o.index.items()} | float_lay.index
        packed = {k: v for o in combo for k, v in o.packed.items()} | float_packed
        return len(assemble(index, packed, meta))

    # every combination, vectorized: estimated bytes (header taken from one assembled combination)
    sizes = [np.array([o.bytes for o in per_group[g]]) for g in groups]
    deltas = [np.array([o.delta for o in per_group[g]]) for g in groups]
    grid = np.stack(np.meshgrid(*[np.arange(len(options))] * len(groups), indexing="ij"), -1).reshape(-1, len(groups))
    est = sum(sizes[j][grid[:, j]] for j in range(len(groups)))
    pred = sum(deltas[j][grid[:, j]] for j in range(len(groups)))
    ref_combo = tuple(per_group[g][0] for g in groups)
    overhead = code_bytes + blob_bytes(ref_combo) - sum(o.bytes for o in ref_combo)
    est = est + overhead

    def combo_of(i: int) -> tuple[Option, ...]:
        return tuple(per_group[g][grid[i, j]] for j, g in enumerate(groups))

    def row(i: int) -> dict:
        combo = combo_of(i)
        exact = blob_bytes(combo) + code_bytes
        r = {f"{g}": o.scheme.label() for g, o in zip(groups, combo)}
        r.update(artifact_bytes=exact, fits=exact <= target, predicted_delta_loss=float(pred[i]),
                 rel_rmse=(sum(o.sq_err for o in combo) / sum(o.sq_ref for o in combo)) ** 0.5)
        return r

    fitting = np.flatnonzero(est <= target)
    if len(fitting) == 0:
        i = int(np.argmin(est))
        smallest = row(i)
        raise CapFitError(
            f"no candidate fits the target of {target:,} bytes (cap {cfg.cap_bytes:,} - margin {cfg.fit_margin_bytes:,}): "
            f"the smallest is {smallest['artifact_bytes']:,} bytes, {smallest['artifact_bytes'] - target:,} over, with "
            + ", ".join(f"{g} {smallest[g]}" for g in groups) + "; add lower fit_bits or coarser fit_clips")

    # build the best few whole (LQER and all), measure exact bytes and held-out loss, keep the best measured
    order = fitting[np.lexsort((est[fitting], pred[fitting]))]
    verified, chosen_i, chosen_score = [], None, None
    for i in order[: max(cfg.fit_verify_top, 1) * 4]:
        if len(verified) >= max(cfg.fit_verify_top, 1):
            break
        combo = combo_of(int(i))
        schemes = {g: o.scheme for g, o in zip(groups, combo)}
        entries = quantizer.entries(schemes)
        lay = layout(entries, quantizer.groups)
        blob = assemble(lay.index, pack_sections(lay, cache, methods, shuffle), meta)
        r = row(int(i))
        r["artifact_bytes"] = len(blob) + code_bytes
        r["fits"] = r["artifact_bytes"] <= target
        if not r["fits"]:
            r["note"] = "over the target once built whole"
            verified.append(r)
            continue
        deq = quantizer.dequantized(entries)
        if scorer:
            r["heldout_loss"] = scorer(deq)
            r["measured_delta_loss"] = r["heldout_loss"] - base_loss
        if val:
            r["val_bpb"] = val(deq)
        score = r.get("heldout_loss", r["predicted_delta_loss"])
        if chosen_score is None or score < chosen_score:
            chosen_i, chosen_score = int(i), score
        verified.append(r)
    if chosen_i is None:
        raise CapFitError(f"no candidate fits the target of {target:,} bytes once built whole "
                          f"(LQER factors or header pushed each of the best over); raise fit_margin_bytes")
    for r in verified:
        r["verified"] = True
    chosen = {g: o.scheme for g, o in zip(groups, combo_of(chosen_i))}

    # the table: the Pareto front of (bytes, predicted loss increase), thinned, plus the verified rows
    by_bytes = np.argsort(est, kind="stable")
    front, best = [], np.inf
    for i in by_bytes:
        if pred[i] < best:
            front.append(int(i))
            best = pred[i]
    if len(front) > MAX_TABLE_ROWS:
        front = [front[int(k)] for k in np.linspace(0, len(front) - 1, MAX_TABLE_ROWS).round()]
    rows = [row(i) for i in front]
    keys_seen = {tuple(r[g] for g in groups) for r in verified}
    rows = [r for r in rows if tuple(r[g] for g in groups) not in keys_seen] + verified
    chosen_key = tuple(chosen[g].label() for g in groups)
    for r in rows:
        r["chosen"] = tuple(r[g] for g in groups) == chosen_key and r.get("verified", False)
    rows.sort(key=lambda r: r["artifact_bytes"])
    pre_val = val(state) if val else None

    group_tables = {g: [{"scheme": o.scheme.label(), "bytes": o.bytes,
                         "rel_rmse": (o.sq_err / o.sq_ref) ** 0.5 if o.sq_ref else 0.0,
                         "delta_loss" if scorer else "proxy": o.delta} for o in per_group[g]] for g in groups}
    report = {"target_bytes": target, "cap_bytes": cfg.cap_bytes, "margin_bytes": cfg.fit_margin_bytes,
              "code_bytes": code_bytes, "float_bytes": sum(len(p.data) for p in float_packed.values()),
              "combinations": int(len(grid)), "fitting": int(len(fitting)), "method": cfg.method,
              "heldout_base_loss": base_loss, "pre_quant_val_bpb": pre_val,
              "quality": "held-out train loss increase (nats/token)" if scorer else
              "proxy: sum of squared relative output errors (no held-out tokens)",
              "chosen": {g: s.label() for g, s in chosen.items()}, "candidates": rows, "groups": group_tables}
    return FitResult(chosen, report, markdown(report, groups))


def markdown(report: dict, groups: list[str]) -> str:
    lines = [f"# Cap-fit candidates ({report['method']})", "",
             f"target {report['target_bytes']:,} bytes = cap {report['cap_bytes']:,} - margin {report['margin_bytes']:,}; "
             f"code {report['code_bytes']:,} bytes; {report['combinations']:,} combinations, {report['fitting']:,} fit.",
             f"Quality: {report['quality']}."
             + (f" Held-out loss of the unquantized weights: {report['heldout_base_loss']:.5f}."
                if report["heldout_base_loss"] is not None else ""),
             ""]
    has_val = any("val_bpb" in r for r in report["candidates"])
    head = [*groups, "artifact bytes", "fits", "pred. Δloss", "held-out Δloss", "rel rmse"] + (["val_bpb"] if has_val else []) + ["chosen"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["candidates"]:
        cells = [r[g] for g in groups] + [f"{r['artifact_bytes']:,}", "yes" if r["fits"] else "no",
                                         f"{r['predicted_delta_loss']:.5f}",
                                         f"{r['measured_delta_loss']:.5f}" if "measured_delta_loss" in r else "",
                                         f"{r['rel_rmse']:.4f}"]
        if has_val:
            cells.append(f"{r['val_bpb']:.4f}" if "val_bpb" in r else "")
        cells.append("**chosen**" if r["chosen"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("pre_quant_val_bpb") is not None:
        lines += ["", f"val_bpb of the unquantized weights: {report['pre_quant_val_bpb']:.4f} (report only)."]
    return "\n".join(lines) + "\n"
