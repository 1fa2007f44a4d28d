"""Quantization of a state dict: per-group bit widths and clips, round to nearest or GPTQ (with LQER), packed
into the weights codec and sized against the cap, the round trip checked bit for bit.

Matrices are quantized per row, per tensor group (the tied embedding, attention q/k/v/out, MLP fc/proj)
with its own bit width (2..8) and clip rule (percentile, SDClip ``sd:K``, or a per-row search), by
round to nearest or by GPTQ with Hessians from *training*-data calibration batches (their seconds are
counted in the training budget: ``calibration.CalibrationRecord``). Optionally the worst tensors get a
low-rank error correction (LQER). Small control tensors stay float16/float32. ``mode=fit`` searches bits x
clip per group for the best predicted quality whose exact bytes fit (``capfit``).

Part of the core: torch, numpy and the core only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checks
from .averaging import HeldoutScorer, heldout_tokens
from .capfit import GroupScheme, pack_options
from .calibration import CalibrationRecord, calibrates
from .devices import resolve_device
from .gptq import (collect_hessians, error_norm, lqer, lqer_asym, output_error, parse_clip, quantize_matrix, sort_rows,
                   weight_error)
from .model import GPT, ModelConfig
from .qpack import COMPRESSORS, SectionCache, assemble, layout, pack_sections
from .quant import decode_weights, dequantize_entry
from .shards import load_tokens

log = logging.getLogger("golf.quantize")
CAP_BYTES = 16_000_000  # the challenge's cap, decimal bytes, code included
GROUPS = ("embed", "attn", "mlp", "other")  # quantized tensor groups; "float" holds what stays float


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "fixed"                 # fixed: the settings below | fit: search bits x clip per group to fit the cap
    method: str = "rtn"                 # rtn (round to nearest) | gptq (Hessian error feedback; calibrates on train data)
    bits: int = 8                       # per-row integer bits for block matrices (2..8)
    embed_bits: int = 8                 # bits for the tied embedding (the most sensitive tensor)
    attn_bits: int = 0                  # bits for attention q/k/v/out (0 = bits)
    mlp_bits: int = 0                   # bits for MLP fc/proj (0 = bits)
    clip: str = "pct:99.99984"          # per-row clip: max | pct:P | sd:K (K x row std) | search:pct | search:sd
    embed_clip: str = ""                # clip rule for the embedding ("" = clip)
    attn_clip: str = ""                 # clip rule for attention matrices ("" = clip)
    mlp_clip: str = ""                  # clip rule for MLP matrices ("" = clip)
    keep_float_max_numel: int = 65_536  # 2-D tensors with at most this many elements (and all 1-D) stay float
    float_dtype: str = "float16"        # float16 | float32 for the tensors kept in float
    compressor: str = "zstd"            # zlib | zstd | lzma | brotli | none | best (smallest per section)
    shuffle: str = "off"                # byte-shuffle multi-byte arrays before compressing: off | on | try
    row_order: str = "none"             # none | scale: store rows sorted by scale, plus the order (for compressors)
    gptq_block: int = 128               # GPTQ column block (lazy batch update width)
    gptq_damp: float = 0.01             # GPTQ dampening, as a fraction of the Hessian's mean diagonal
    gptq_act_order: bool = True         # GPTQ quantizes columns in order of decreasing input energy
    gptq_embed: bool = True             # GPTQ the tied embedding too, with the output head's input Hessian
    calib_seqs: int = 64                # calibration sequences from the head of the train shards (GPTQ, LQER)
    seq_len: int = 1024                 # context for calibration and held-out scoring (use the training seq_len)
    lqer_rank: int = 0                  # rank of the low-rank error correction (0 = off; records: 4)
    lqer_top: int = 3                   # how many tensors (highest relative output error) get it
    lqer_bits: int = 4                  # bits of the correction factors (sym)
    # sym: activation-scaled SVD, both factors per-row at lqer_bits, tensors ranked by relative output error.
    # asym (the records'): plain SVD of the error, A in 2 bits ([-2, 1]) under one scale, B in 4 bits with a scale
    # per lqer_group values, tensors ranked by the Frobenius norm of their error
    lqer_mode: str = "sym"
    lqer_group: int = 64
    gate_int8: bool = False             # attention gate weights as int8 per row, not float (the records')
    device: str = "auto"                # auto | cpu | cuda: where calibration, GPTQ and held-out scoring run
    cap_bytes: int = CAP_BYTES          # the size cap the artifact must fit
    fail_over_cap: bool = True          # stop with an error when over the cap (else compliance reports it)
    fit_bits: str = "5,6,7,8"           # fit: bit widths tried for every group
    fit_clips: str = "sd:8,sd:12.85,sd:16,pct:99.99984"  # fit: clip rules tried for every group
    fit_margin_bytes: int = 10_000      # fit: the target is cap_bytes minus this
    heldout_tokens: int = 32768         # fit: training tokens (tail of the last shard) scoring candidates (0 = weight error)
    fit_verify_top: int = 3             # fit: score this many best-predicted fitting candidates whole, keep the best
    fit_val_bpb: bool = False           # fit: also report val_bpb of the scored candidates (report only, never chooses)
    fit_val_tokens: int = 0             # fit: val tokens for that report (0 = all)
    # the eval config (JSON) that train_gpt.py embeds, so that its counted bytes are the shipped file's; golf run
    # fills it from the run's eval config (golf.pipeline.ship_eval); "" = the eval's defaults
    ship_eval: str = ""
    # mode=fixed: take weights.bin from a quantize artifact of the same store made by the same code from the same
    # inputs with the same settings, but another embedded eval (or cap): an eval-only change then costs no GPTQ
    reuse_weights: bool = True

    def __post_init__(self):
        allowed = {"mode": ("fixed", "fit"), "method": ("rtn", "gptq"), "float_dtype": ("float16", "float32"),
                  "compressor": (*COMPRESSORS, "none", "best"), "shuffle": ("off", "on", "try"),
                  "row_order": ("none", "scale"), "device": ("auto", "cpu", "cuda"), "lqer_mode": ("sym", "asym")}
        checks.choices(self, "quantize", allowed)
        for name in ("bits", "embed_bits", "attn_bits", "mlp_bits", "lqer_bits"):
            v = getattr(self, name)
            if not (2 <= v <= 8 or (v == 0 and name in ("attn_bits", "mlp_bits"))):
                raise ValueError(f"quantize.{name} must be in 2..8, not {v}")
        for name in ("clip", "embed_clip", "attn_clip", "mlp_clip"):
            if getattr(self, name):
                parse_clip(getattr(self, name))
        checks.ints(self, "quantize", ("gptq_block", "seq_len", "cap_bytes", "fit_verify_top", "lqer_group"), 1)
        checks.ints(self, "quantize", ("calib_seqs", "keep_float_max_numel", "lqer_rank", "lqer_top", "fit_margin_bytes",
                                       "heldout_tokens", "fit_val_tokens"))
        checks.reals(self, "quantize", ("gptq_damp",))
        checks.need(self.calib_seqs > 0 or (self.method == "rtn" and self.lqer_rank == 0),
                    "quantize.calib_seqs must be >= 1 for method=gptq or lqer_rank > 0 (they calibrate on it)")


class OverCap(RuntimeError):
    pass


def group_of(name: str, w: torch.Tensor, cfg: QuantizeConfig) -> str:
    # only layer weights are quantized: gates, skip weights and lane lambdas stay float whatever their size
    # (GPTQ has Hessians for the linear layers alone)
    if w.ndim != 2 or w.numel() <= cfg.keep_float_max_numel or not name.endswith(".weight"):
        return "float"
    if name == "embed.weight":
        return "embed"
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "other"


def fixed_schemes(cfg: QuantizeConfig) -> dict[str, GroupScheme]:
    return {"embed": GroupScheme(cfg.embed_bits, cfg.embed_clip or cfg.clip),
            "attn": GroupScheme(cfg.attn_bits or cfg.bits, cfg.attn_clip or cfg.clip),
            "mlp": GroupScheme(cfg.mlp_bits or cfg.bits, cfg.mlp_clip or cfg.clip),
            "other": GroupScheme(cfg.bits, cfg.clip)}


# --- training-data slices ------------------------------------------------------------------------
def calibration_tokens(train_shards: list[Path], n: int) -> tuple[np.ndarray, list[str]]:
    """The first n tokens of the train shards (never val): what GPTQ calibrates on."""
    parts, names, have = [], [], 0
    for path in train_shards:
        if have >= n:
            break
        toks = np.asarray(load_tokens(path)[: n - have])
        parts.append(toks)
        names.append(path.name)
        have += len(toks)
    return np.concatenate(parts), names


# --- quantizing a state dict ---------------------------------------------------------------------
class Quantizer:
    """Quantizes tensor groups of one state dict under given schemes, caching each (group, scheme)."""

    def __init__(self, state: dict[str, torch.Tensor], cfg: QuantizeConfig,
                 hessians: dict[str, torch.Tensor] | None):
        self.state, self.cfg, self.H = state, cfg, hessians or {}
        self.groups = {n: group_of(n, w, cfg) for n, w in state.items()}
        self.present = [g for g in GROUPS if g in self.groups.values()]
        self._cache: dict[tuple[str, GroupScheme], dict[str, dict]] = {}
        fdt = torch.float16 if cfg.float_dtype == "float16" else torch.float32
        self.floats = {n: {"float": w.detach().to(fdt)} for n, w in state.items() if self.groups[n] == "float"}
        if cfg.gate_int8:  # small, so in the float group's sections, but as int8 rows (max clip: 127 steps per row)
            for n in self.floats:
                if n.endswith(".attn.gate_w") and state[n].ndim == 2:
                    self.floats[n] = quantize_matrix(state[n], 8, "max")

    def names(self, group: str) -> list[str]:
        return [n for n, g in self.groups.items() if g == group]

    def hessian(self, name: str) -> torch.Tensor | None:
        if self.cfg.method != "gptq" or (name == "embed.weight" and not self.cfg.gptq_embed):
            return None
        return self.H[name]

    def group(self, group: str, scheme: GroupScheme) -> dict[str, dict]:
        key = (group, scheme)
        if key not in self._cache:
            c = self.cfg
            self._cache[key] = {n: quantize_matrix(self.state[n], scheme.bits, scheme.clip, self.hessian(n),
                                                   c.gptq_block, c.gptq_damp, c.gptq_act_order)
                                for n in self.names(group)}
        return self._cache[key]

    def rel_output_error(self, name: str, entry: dict) -> float:
        """Relative output error with the calibration Hessian, else relative weight error."""
        deq = dequantize_entry(entry)
        if name in self.H:
            return output_error(self.state[name], deq, self.H[name])
        err, ref = weight_error(self.state[name], deq)
        return (err / ref) ** 0.5 if ref else 0.0

    def entries(self, schemes: dict[str, GroupScheme]) -> dict[str, dict]:
        """Every tensor's entry, in state-dict order, with LQER and row order applied as configured."""
        q = {}
        for g in self.present:
            q.update(self.group(g, schemes[g]))
        c = self.cfg
        if c.lqer_rank > 0 and c.lqer_top > 0 and c.lqer_mode == "asym":
            worst = sorted(q, key=lambda n: error_norm(self.state[n], q[n]), reverse=True)[: c.lqer_top]
            for n in worst:
                q[n] = lqer_asym(self.state[n], q[n], c.lqer_rank, c.lqer_group)
        elif c.lqer_rank > 0 and c.lqer_top > 0:
            worst = sorted(q, key=lambda n: self.rel_output_error(n, q[n]), reverse=True)[: c.lqer_top]
            for n in worst:
                q[n] = lqer(self.state[n], q[n], c.lqer_rank, c.lqer_bits, self.H.get(n))
        if c.row_order == "scale":
            q = {n: sort_rows(t) for n, t in q.items()}
        return {n: q[n] if n in q else self.floats[n] for n in self.state}

    def dequantized(self, entries: dict[str, dict]) -> dict[str, torch.Tensor]:
        return {n: dequantize_entry(t) if "q" in t else t["float"].float() for n, t in entries.items()}


def encode(entries: dict[str, dict], groups: dict[str, str], meta: dict, cache: SectionCache,
           methods: list[str], shuffle: bool | None) -> tuple[bytes, dict]:
    lay = layout(entries, groups)
    packed = pack_sections(lay, cache, methods, shuffle)
    return assemble(lay.index, packed, meta), packed


# --- the stage -----------------------------------------------------------------------------------
@dataclass
class Quantized:
    """What quantizing one state dict produced (the stage writes it out; the benchmark reads it)."""
    blob: bytes
    wrapped_code: str
    readable_code: str
    deq: dict[str, torch.Tensor]        # the in-memory quantized weights, as the blob must decode
    size: dict                          # size.json
    metrics: dict
    fit: object | None                  # capfit.FitResult in fit mode
    calibration: CalibrationRecord | None = None  # what calibration read (None: it read no data)


def calibrate(state: dict, model_cfg: ModelConfig, train_shards: list[Path], cfg: QuantizeConfig,
              device: torch.device) -> tuple[dict[str, torch.Tensor], CalibrationRecord]:
    """Hessians of every Linear's input from the head of the train shards, and the record of what was read."""
    tokens, shards = calibration_tokens(train_shards, cfg.calib_seqs * cfg.seq_len)
    model = GPT(model_cfg)
    model.load_state_dict(state)
    hessians, calib_s = collect_hessians(model, tokens, cfg.seq_len, 16, device)
    log.info("calibration: %d Hessians from %s train tokens (%s) in %.2f s", len(hessians),
             f"{len(tokens):,}", ", ".join(shards), calib_s)
    return hessians, CalibrationRecord(source="train", shards=tuple(shards), tokens=int(len(tokens)),
                                       seconds=round(calib_s, 3))


QuantizeConfig.NOT_IN_KEY = ("reuse_weights",)  # the same weights either way (GPU rounding aside)
# fields that change the shipped code or the cap check but not the weights (mode=fixed): the weights of an artifact
# that differs only in these can be reused
WEIGHTS_INDEPENDENT = ("ship_eval", "reuse_weights", "fail_over_cap", "cap_bytes")


def quantize_weights(state: dict[str, torch.Tensor], model_cfg: ModelConfig, cfg: QuantizeConfig,
                     train_shards: list[Path], code: tuple[str, str],
                     val_stream: Callable[[int], tuple[np.ndarray, int]] | None = None,
                     hessians: tuple[dict, CalibrationRecord] | None = None) -> Quantized:
    """Quantize, pack and size one state dict under ``cfg``; check the round trip and the cap.

    ``train_shards`` feed calibration (their head) and the cap fit's held-out slice (their tail); ``code`` is
    (readable, wrapped) shipped code, whose wrapped bytes count against the cap; ``val_stream(max_tokens)``
    gives (val tokens, their bytes) for the fit's report only. ``hessians`` (from ``calibrate``) may be passed
    in to share one calibration between configs."""
    device = resolve_device(cfg.device, "quantize.device")
    meta = {"model_config": dataclasses.asdict(model_cfg)}
    metrics: dict = {"calibration_seconds": 0.0}
    H, calibration = None, None
    if calibrates(dataclasses.asdict(cfg)):
        H, calibration = hessians or calibrate(state, model_cfg, train_shards, cfg, device)
        metrics.update(calibration.metrics())

    readable, wrapped = code
    code_bytes = len(wrapped.encode("utf-8"))
    quantizer = Quantizer(state, cfg, H)
    cache = SectionCache()  # sections compressed while fitting are not compressed again for the blob
    methods, shuffle = pack_options(cfg)
    fit_result = None
    t0 = time.perf_counter()
    if cfg.mode == "fit":
        fit_result = run_fit(quantizer, model_cfg, cfg, train_shards, val_stream, H is not None, code_bytes, meta,
                             cache, device)
        schemes = fit_result.chosen
        metrics.update(fit_candidates=fit_result.report["combinations"],
                       fit_target_bytes=fit_result.report["target_bytes"],
                       fit_seconds=round(time.perf_counter() - t0, 3))
    else:
        schemes = fixed_schemes(cfg)
    entries = quantizer.entries(schemes)
    deq = quantizer.dequantized(entries)
    t1 = time.perf_counter()
    blob, packed = encode(entries, quantizer.groups, meta, cache, methods, shuffle)
    compress_s = time.perf_counter() - t1
    decompress_s = check_round_trip(blob, deq)

    rows, sq_err, sq_ref = tensor_rows(quantizer, entries, deq)
    size = size_json(quantizer, schemes, readable, code_bytes, len(blob), packed, rows)
    check_cap(size, cfg)
    metrics.update(artifact_metrics(quantizer, deq, size, packed, sq_err / sq_ref, compress_s, decompress_s))
    return Quantized(blob, wrapped, readable, deq, size, metrics, fit_result, calibration)


def run_fit(quantizer: Quantizer, model_cfg: ModelConfig, cfg: QuantizeConfig, train_shards: list[Path],
            val_stream: Callable[[int], tuple[np.ndarray, int]] | None, calibrated: bool, code_bytes: int,
            meta: dict, cache: SectionCache, device: torch.device):
    """mode=fit: the cap fit (``capfit.fit``) scored on held-out train tokens (or the proxy without them), with
    the val_bpb reporter when asked for."""
    from gpt.capfit import fit
    scorer = None
    if cfg.heldout_tokens > 0:
        scorer = heldout_scorer(model_cfg, cfg, train_shards, calibrated, device)
    val = val_reporter(val_stream, model_cfg, cfg, device) if cfg.fit_val_bpb and val_stream else None
    return fit(quantizer, cfg, code_bytes, meta, cache, scorer, val)


def heldout_scorer(model_cfg: ModelConfig, cfg: QuantizeConfig, train_shards: list[Path], calibrated: bool,
                   device: torch.device) -> HeldoutScorer:
    """The fit's quality measure: the mean loss on the tail of the train stream (never val)."""
    scorer = HeldoutScorer(model_cfg, heldout_tokens(train_shards, cfg.heldout_tokens), cfg.seq_len, device)
    # calibration reads the head of the train stream, the held-out slice its tail: they must not meet
    total = sum(len(load_tokens(p)) for p in train_shards)
    calib = cfg.calib_seqs * cfg.seq_len if calibrated else 0
    if calib + cfg.heldout_tokens + 1 > total:
        raise ValueError(f"quantize: calibration ({calib:,} tokens) and the held-out slice "
                         f"({cfg.heldout_tokens:,}) overlap in {total:,} train tokens; lower calib_seqs "
                         f"or heldout_tokens")
    return scorer


def check_round_trip(blob: bytes, deq: dict[str, torch.Tensor]) -> float:
    """What an evaluator decodes must equal what we quantized, bit for bit; the decode's seconds."""
    t2 = time.perf_counter()
    decoded, _ = decode_weights(blob)
    decompress_s = time.perf_counter() - t2
    for name, w in deq.items():
        if not torch.equal(decoded[name], w):
            raise RuntimeError(f"round trip failed: tensor {name} differs after decoding the blob")
    return decompress_s


def tensor_rows(quantizer: Quantizer, entries: dict[str, dict],
                deq: dict[str, torch.Tensor]) -> tuple[list[dict], float, float]:
    """size.json's row of every tensor, and the squared weight error and reference summed over all of them."""
    cfg, groups = quantizer.cfg, quantizer.groups
    rows, sq_err, sq_ref = [], 0.0, 0.0
    for name, w in quantizer.state.items():
        err, ref = weight_error(w, deq[name])
        sq_err, sq_ref = sq_err + err, sq_ref + ref
        t = entries[name]
        scheme = f"int{t['bits']}" if "q" in t else cfg.float_dtype
        rows.append({"tensor": name, "group": groups[name], "shape": list(w.shape), "scheme": scheme,
                     "lqer": bool(t.get("lqer")), "rel_rmse": (err / ref) ** 0.5 if ref else 0.0,
                     "rel_output_error": quantizer.rel_output_error(name, t) if name in quantizer.H and "q" in t else None})
    return rows, sq_err, sq_ref


def size_json(quantizer: Quantizer, schemes: dict[str, GroupScheme], readable: str, code_bytes: int,
              weights_bytes: int, packed: dict, rows: list[dict]) -> dict:
    """size.json: the bytes that count against the cap, per section and per tensor."""
    cfg = quantizer.cfg
    total = weights_bytes + code_bytes
    section_rows = [{"section": f"{k[0]}:{k[1]}", "compressor": p.method, "shuffle": p.width > 1,
                     "bytes": len(p.data)} for k, p in sorted(packed.items())]
    scheme_text = {g: schemes[g].label() for g in quantizer.present}
    return {"weights_bytes": weights_bytes, "code_bytes": code_bytes, "artifact_bytes": total,
            "cap_bytes": cfg.cap_bytes, "margin_bytes": cfg.cap_bytes - total,
            "code_bytes_readable": len(readable.encode("utf-8")), "method": cfg.method, "schemes": scheme_text,
            "sections": section_rows, "tensors": rows}


def check_cap(size: dict, cfg: QuantizeConfig) -> None:
    """Log the artifact's bytes; over the cap, stop (with fail_over_cap off the compliance stage reports it)."""
    total, weights_bytes, code_bytes = size["artifact_bytes"], size["weights_bytes"], size["code_bytes"]
    log.info("artifact %s bytes = weights %s + code %s (cap %s, margin %s); %s", f"{total:,}", f"{weights_bytes:,}",
             f"{code_bytes:,}", f"{cfg.cap_bytes:,}", f"{cfg.cap_bytes - total:,}",
             ", ".join(f"{g} {s}" for g, s in size["schemes"].items()))
    if total > cfg.cap_bytes and cfg.fail_over_cap:
        raise OverCap(f"artifact is {total:,} bytes, {total - cfg.cap_bytes:,} over the cap of {cfg.cap_bytes:,} "
                      f"(weights {weights_bytes:,} + code {code_bytes:,}); lower the bits, use another compressor, "
                      f"or set quantize.mode=fit")


def artifact_metrics(quantizer: Quantizer, deq: dict[str, torch.Tensor], size: dict, packed: dict,
                     rel_sq_err: float, compress_s: float, decompress_s: float) -> dict:
    """The stage's metrics of the artifact: its bytes against the cap, the quantization error (overall and per
    group), the schemes and compressors, the codec's seconds."""
    cfg, state = quantizer.cfg, quantizer.state
    total = size["artifact_bytes"]
    group_err = {}
    for g in quantizer.present:
        e = [weight_error(state[n], deq[n]) for n in quantizer.names(g)]
        group_err[f"quant_rel_rmse_{g}"] = (sum(a for a, _ in e) / sum(b for _, b in e)) ** 0.5
    return {"artifact_bytes": total, "weights_bytes": size["weights_bytes"], "code_bytes": size["code_bytes"],
            "cap_bytes": cfg.cap_bytes, "fits": total <= cfg.cap_bytes, "margin_bytes": cfg.cap_bytes - total,
            "quant_rel_rmse": rel_sq_err ** 0.5, **group_err,
            "scheme": "; ".join(f"{g} {s}" for g, s in size["schemes"].items()) + f"; {cfg.method}",
            "compressors": sorted({p.method for p in packed.values()}),
            "compress_seconds": round(compress_s, 3), "decompress_seconds": round(decompress_s, 3)}


def val_reporter(val_stream: Callable[[int], tuple[np.ndarray, int]], model_cfg: ModelConfig, cfg: QuantizeConfig,
                 device: torch.device):
    """val_bpb of a state dict on the val shards: for the candidate table only, never for choosing."""
    from .bpb import bits_per_byte
    tokens, n_bytes = val_stream(cfg.fit_val_tokens)
    mean_nll = HeldoutScorer(model_cfg, tokens, cfg.seq_len, device)
    return lambda state: bits_per_byte(mean_nll(state) * (len(tokens) - 1), n_bytes)
