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


def parse_grid(cfg) -> list[GroupScheme]:
    """Every group option of the grid: each of fit_bits with each of fit_clips, checked before any work."""
    bits = parse_list(cfg.fit_bits, int, "fit_bits")
    clips = parse_list(cfg.fit_clips, str, "fit_clips")
    for b in bits:
        if not 2 <= b <= 8:
            raise CapFitError(f"quantize.fit_bits: {b} is not in 2..8")
    for c in clips:
        parse_clip(c)
    return [GroupScheme(b, c) for b in bits for c in clips]


def group_layout(quantizer, cfg, g: str, scheme: GroupScheme):
    """One group's entries under one scheme (rows sorted as configured) and their section layout."""
    ent = quantizer.group(g, scheme)
    if cfg.row_order == "scale":
        ent = {n: sort_rows(t) for n, t in ent.items()}
    return ent, layout(ent, {n: g for n in ent})


def score_group(quantizer, cfg, g: str, options: list[GroupScheme], cache: SectionCache, methods: list[str],
                shuffle: bool | None, scorer, base_loss) -> list[Option]:
    """Every option of one group: its compressed bytes, weight error and loss increase with only it quantized."""
    state = quantizer.state
    # the compressor (and shuffle) each of this group's sections prefers, judged on a middle option
    _, ref_lay = group_layout(quantizer, cfg, g, options[len(options) // 2])
    prefer = {k[1]: (p.method, p.width) for k, p in pack_sections(ref_lay, cache, methods, shuffle).items()}
    # quantize every option first, then compress them all at once in threads (the codecs release the GIL)
    built = [(scheme, *group_layout(quantizer, cfg, g, scheme)) for scheme in options]
    jobs = [(bytes(raw), *prefer[k[1]]) for _, _, lay in built for k, raw in lay.raw.items()]
    cache.warm(jobs)
    scored = []
    for scheme, ent, lay in built:
        packed = {k: cache.get(bytes(raw), *prefer[k[1]]) for k, raw in lay.raw.items()}
        deq = {n: dequantize_entry(t) for n, t in ent.items()}
        errs = [weight_error(state[n], deq[n]) for n in ent]
        if scorer:
            delta = scorer({**state, **deq}) - base_loss
        else:  # no held-out tokens: the sum of squared relative output (or weight) errors
            delta = sum(quantizer.rel_output_error(n, t) ** 2 for n, t in ent.items())
        scored.append(Option(scheme, sum(len(p.data) for p in packed.values()), sum(e for e, _ in errs),
                             sum(r for _, r in errs), delta, lay.index, packed))
    return scored


@dataclass
class Grid:
    """Every combination of one option per group, with its estimated bytes and predicted loss increase."""
    groups: list[str]
    per_group: dict[str, list[Option]]
    float_index: dict       # the float tensors' layout index and packed sections: in every combination
    float_packed: dict
    meta: dict
    code_bytes: int
    target: int
    index: np.ndarray       # (combinations, groups): the option of each group in each combination
    est: np.ndarray         # estimated artifact bytes of each combination
    pred: np.ndarray        # predicted loss increase of each combination

    @classmethod
    def build(cls, groups, per_group, n_options: int, float_index, float_packed, meta, code_bytes: int,
              target: int) -> "Grid":
        # every combination, vectorized: estimated bytes (header taken from one assembled combination)
        sizes = [np.array([o.bytes for o in per_group[g]]) for g in groups]
        deltas = [np.array([o.delta for o in per_group[g]]) for g in groups]
        index = np.stack(np.meshgrid(*[np.arange(n_options)] * len(groups), indexing="ij"), -1).reshape(-1, len(groups))
        est = sum(sizes[j][index[:, j]] for j in range(len(groups)))
        pred = sum(deltas[j][index[:, j]] for j in range(len(groups)))
        grid = cls(groups, per_group, float_index, float_packed, meta, code_bytes, target, index, est, pred)
        ref_combo = tuple(per_group[g][0] for g in groups)
        overhead = code_bytes + grid.blob_bytes(ref_combo) - sum(o.bytes for o in ref_combo)
        grid.est = est + overhead
        return grid

    def blob_bytes(self, combo: tuple[Option, ...]) -> int:
        index = {k: v for o in combo for k, v in o.index.items()} | self.float_index
        packed = {k: v for o in combo for k, v in o.packed.items()} | self.float_packed
        return len(assemble(index, packed, self.meta))

    def combo(self, i: int) -> tuple[Option, ...]:
        return tuple(self.per_group[g][self.index[i, j]] for j, g in enumerate(self.groups))

    def row(self, i: int) -> dict:
        """The table row of combination i, with its exact bytes (assembled from the cached sections)."""
        combo = self.combo(i)
        exact = self.blob_bytes(combo) + self.code_bytes
        r = {f"{g}": o.scheme.label() for g, o in zip(self.groups, combo)}
        r.update(artifact_bytes=exact, fits=exact <= self.target, predicted_delta_loss=float(self.pred[i]),
                 rel_rmse=(sum(o.sq_err for o in combo) / sum(o.sq_ref for o in combo)) ** 0.5)
        return r


def nothing_fits(grid: Grid, cfg) -> CapFitError:
    """The error when no combination's estimate fits: how far over the smallest is, and what to change."""
    target, groups = grid.target, grid.groups
    smallest = grid.row(int(np.argmin(grid.est)))
    return CapFitError(
        f"no candidate fits the target of {target:,} bytes (cap {cfg.cap_bytes:,} - margin {cfg.fit_margin_bytes:,}): "
        f"the smallest is {smallest['artifact_bytes']:,} bytes, {smallest['artifact_bytes'] - target:,} over, with "
        + ", ".join(f"{g} {smallest[g]}" for g in groups) + "; add lower fit_bits or coarser fit_clips")


def verify_best(grid: Grid, fitting: np.ndarray, quantizer, cfg, cache: SectionCache, methods: list[str],
                shuffle: bool | None, scorer, base_loss, val) -> tuple[list[dict], int]:
    """Build the best few whole (LQER and all), measure exact bytes and held-out loss: (their rows, the best's
    combination). The prediction ranks them; the measured held-out loss (else the prediction) chooses."""
    order = fitting[np.lexsort((grid.est[fitting], grid.pred[fitting]))]
    verified, chosen_i, chosen_score = [], None, None
    for i in order[: max(cfg.fit_verify_top, 1) * 4]:
        if len(verified) >= max(cfg.fit_verify_top, 1):
            break
        combo = grid.combo(int(i))
        schemes = {g: o.scheme for g, o in zip(grid.groups, combo)}
        entries = quantizer.entries(schemes)
        lay = layout(entries, quantizer.groups)
        blob = assemble(lay.index, pack_sections(lay, cache, methods, shuffle), grid.meta)
        r = grid.row(int(i))
        r["artifact_bytes"] = len(blob) + grid.code_bytes
        r["fits"] = r["artifact_bytes"] <= grid.target
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
        raise CapFitError(f"no candidate fits the target of {grid.target:,} bytes once built whole "
                          f"(LQER factors or header pushed each of the best over); raise fit_margin_bytes")
    for r in verified:
        r["verified"] = True
    return verified, chosen_i


def table_rows(grid: Grid, verified: list[dict], chosen: dict[str, GroupScheme]) -> list[dict]:
    """The table: the Pareto front of (bytes, predicted loss increase), thinned, plus the verified rows."""
    groups, est, pred = grid.groups, grid.est, grid.pred
    by_bytes = np.argsort(est, kind="stable")
    front, best = [], np.inf
    for i in by_bytes:
        if pred[i] < best:
            front.append(int(i))
            best = pred[i]
    if len(front) > MAX_TABLE_ROWS:
        front = [front[int(k)] for k in np.linspace(0, len(front) - 1, MAX_TABLE_ROWS).round()]
    rows = [grid.row(i) for i in front]
    keys_seen = {tuple(r[g] for g in groups) for r in verified}
    rows = [r for r in rows if tuple(r[g] for g in groups) not in keys_seen] + verified
    chosen_key = tuple(chosen[g].label() for g in groups)
    for r in rows:
        r["chosen"] = tuple(r[g] for g in groups) == chosen_key and r.get("verified", False)
    rows.sort(key=lambda r: r["artifact_bytes"])
    return rows


def fit_report(grid: Grid, cfg, fitting: np.ndarray, chosen: dict[str, GroupScheme], rows: list[dict],
               scorer, base_loss, pre_val) -> dict:
    """report.json of the fit: the target, what was searched, the per-group options and the candidate table."""
    groups, per_group = grid.groups, grid.per_group
    group_tables = {g: [{"scheme": o.scheme.label(), "bytes": o.bytes,
                         "rel_rmse": (o.sq_err / o.sq_ref) ** 0.5 if o.sq_ref else 0.0,
                         "delta_loss" if scorer else "proxy": o.delta} for o in per_group[g]] for g in groups}
    return {"target_bytes": grid.target, "cap_bytes": cfg.cap_bytes, "margin_bytes": cfg.fit_margin_bytes,
            "code_bytes": grid.code_bytes, "float_bytes": sum(len(p.data) for p in grid.float_packed.values()),
            "combinations": int(len(grid.index)), "fitting": int(len(fitting)), "method": cfg.method,
            "heldout_base_loss": base_loss, "pre_quant_val_bpb": pre_val,
            "quality": "held-out train loss increase (nats/token)" if scorer else
            "proxy: sum of squared relative output errors (no held-out tokens)",
            "chosen": {g: s.label() for g, s in chosen.items()}, "candidates": rows, "groups": group_tables}


def fit(quantizer, cfg, code_bytes: int, meta: dict, cache: SectionCache, scorer, val) -> FitResult:
    """The chosen scheme per group, the report and its markdown table (module docstring: how)."""
    target = cfg.cap_bytes - cfg.fit_margin_bytes
    options = parse_grid(cfg)
    methods, shuffle = pack_options(cfg)
    state = quantizer.state
    base_loss = scorer(state) if scorer else None

    # the float tensors are the same in every combination: packed once
    float_lay = layout(quantizer.floats, {n: "float" for n in quantizer.floats})
    float_packed = pack_sections(float_lay, cache, methods, shuffle)
    groups = quantizer.present
    per_group = {g: score_group(quantizer, cfg, g, options, cache, methods, shuffle, scorer, base_loss) for g in groups}
    grid = Grid.build(groups, per_group, len(options), float_lay.index, float_packed, meta, code_bytes, target)

    fitting = np.flatnonzero(grid.est <= target)
    if len(fitting) == 0:
        raise nothing_fits(grid, cfg)
    verified, chosen_i = verify_best(grid, fitting, quantizer, cfg, cache, methods, shuffle, scorer, base_loss, val)
    chosen = {g: o.scheme for g, o in zip(groups, grid.combo(chosen_i))}
    rows = table_rows(grid, verified, chosen)
    pre_val = val(state) if val else None  # report only: validation data never takes part in the choice
    report = fit_report(grid, cfg, fitting, chosen, rows, scorer, base_loss, pre_val)
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
