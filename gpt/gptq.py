"""Quantizing one matrix: per-row clip rules, round-to-nearest, GPTQ, and low-rank error correction.

- Clip rules give each row's clip c (scale = c / qmax): ``max`` (|w| max), ``pct:P`` (the P-th
  percentile of |w|), ``sd:K`` (K x the row's standard deviation, "SDClip"), and ``search:pct`` /
  ``search:sd``, which try a grid of those per row and keep the one with the lowest squared error.
- GPTQ quantizes columns one at a time and spreads each column's rounding error over the columns not
  yet quantized, weighted by the inverse Hessian H = E[x x^T] of the layer's input, so the layer's
  *output* error is what is minimized. Hessians come from training-data calibration batches.
- LQER adds a rank-r correction A @ B of the remaining error (activation-scaled SVD), its factors
  quantized per row too.

Nothing here ships; ``gpt.quant`` decodes what these produce.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .quant import dequantize_entry, dequantize_rows

PCT_GRID = (99.0, 99.9, 99.99, 99.999, 100.0)
SD_GRID = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.85, 16.0, 20.0)


class ClipSpecError(ValueError):
    """A clip rule that cannot be parsed."""


def parse_clip(spec: str) -> tuple[str, float]:
    """'max' | 'pct:P' | 'sd:K' | 'search:pct' | 'search:sd' -> (kind, value)."""
    s = spec.strip().lower()
    if s == "max":
        return "max", 0.0
    if s in ("search:pct", "search:sd"):
        return s, 0.0
    kind, _, val = s.partition(":")
    try:
        v = float(val)
    except ValueError:
        v = float("nan")
    if kind == "pct" and 0 < v <= 100:
        return "pct", v
    if kind == "sd" and v > 0:
        return "sd", v
    raise ClipSpecError(f"clip {spec!r}: expected max, pct:P (0<P<=100), sd:K (K>0), search:pct or search:sd")


def row_clip(w: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """Per-row clip for one fixed rule (not a search)."""
    a = w.abs()
    if kind == "max" or (kind == "pct" and value >= 100):
        return a.amax(dim=1)
    if kind == "pct":
        return torch.quantile(a, value / 100.0, dim=1)
    if kind == "sd":
        # not capped at the row max: k sets the step (k * std / qmax), hence the entropy of the values
        return value * w.std(dim=1, unbiased=False)
    raise ClipSpecError(f"not a fixed clip rule: {kind}")


def scale_of(clip: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return (clip / qmax).clamp_min(2.0 ** -24).to(torch.float16)  # fp16's smallest step: all-zero rows stay 0


def rtn(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to nearest with the given fp16 row scales: int8 values in [-qmax, qmax]."""
    qmax = 2 ** (bits - 1) - 1
    return torch.round(w / scale.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)


def row_scales(w: torch.Tensor, bits: int, spec: str) -> torch.Tensor:
    """fp16 per-row scales for a clip rule; a search keeps, per row, the candidate with the least squared error."""
    kind, value = parse_clip(spec)
    w = w.float()
    if not kind.startswith("search"):
        return scale_of(row_clip(w, kind, value), bits)
    grid = [("pct", p) for p in PCT_GRID] if kind == "search:pct" else [("sd", k) for k in SD_GRID] + [("max", 0)]
    best_s, best_e = None, None
    for k, v in grid:
        s = scale_of(row_clip(w, k, v), bits)
        err = (dequantize_rows(rtn(w, s, bits), s) - w).pow(2).sum(dim=1)
        if best_s is None:
            best_s, best_e = s, err
        else:
            better = err < best_e
            best_s = torch.where(better, s, best_s)
            best_e = torch.minimum(err, best_e)
    return best_s


def gptq(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, bits: int, block: int = 128,
         damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """GPTQ with fixed per-row scales: int8 values (rows x cols) minimizing the layer's output error."""
    qmax = 2 ** (bits - 1) - 1
    W = w.detach().float().clone()
    H = H.detach().float().to(W.device).clone()
    cols = W.shape[1]
    assert H.shape == (cols, cols), (H.shape, W.shape)
    s = scale.float().to(W.device)[:, None]
    dead = torch.diag(H) == 0  # inputs never active in calibration: their weights cannot matter to it
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(cols, device=W.device)
    # the upper Cholesky factor of H^-1: row i holds the weights that spread column i's error forward
    for extra in (0.0, 0.1, 1.0):
        try:
            Hd = H + extra * torch.diag(H).mean() * torch.eye(cols, device=W.device)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with extra damping")
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.round(col / s[:, 0]).clamp_(-qmax, qmax)
            Q[:, i1 + i] = q
            err = (col - q * s[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8).cpu()


def quantize_matrix(w: torch.Tensor, bits: int, clip: str, H: torch.Tensor | None = None,
                    block: int = 128, damp: float = 0.01, act_order: bool = True) -> dict:
    """One matrix -> {"q", "scale", "bits"}: GPTQ when a Hessian is given, else round to nearest."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    w = w.detach().float()
    scale = row_scales(w, bits, clip)
    if H is None:
        q = rtn(w, scale, bits)
    else:
        q = gptq(w.to(H.device), H, scale.to(H.device), bits, block, damp, act_order)
    return {"q": q, "scale": scale, "bits": bits}


def sort_rows(t: dict) -> dict:
    """Store rows in order of their scale (ties by index) with the order kept, for compressors that adapt."""
    perm = torch.argsort(t["scale"].float(), stable=True)
    return {**t, "q": t["q"][perm].contiguous(), "scale": t["scale"][perm].contiguous(), "perm": perm.to(torch.int32)}


def lqer(w: torch.Tensor, t: dict, rank: int, bits: int, H: torch.Tensor | None = None) -> dict:
    """Add a rank-``rank`` correction of w - dequant(t), from an SVD scaled by the inputs' RMS when H is given."""
    E = w.float() - dequantize_entry(t)
    s = H.diagonal().float().cpu().clamp_min(1e-12).sqrt() if H is not None else torch.ones(E.shape[1])
    s = s / s.mean()
    U, S, Vh = torch.linalg.svd(E * s[None, :], full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    At = (U[:, :r] * root[None, :]).T.contiguous()           # r x rows
    B = (root[:, None] * Vh[:r]) / s[None, :]                 # r x cols
    factors = []
    for f in (At, B):
        sc = scale_of(f.abs().amax(dim=1), bits)
        factors.append({"q": rtn(f, sc, bits), "scale": sc, "bits": bits})
    return {**t, "lqer": factors}


def lqer_asym(w: torch.Tensor, t: dict, rank: int, group: int = 64) -> dict:
    """The records' LQER: a rank-``rank`` SVD of the plain error E = U S V^T, A = U S in 2 bits under one scale
    (values -2..1, scale max|A| / 1.5), B = V^T in 4 bits (-8..7) with a scale per ``group`` consecutive values
    (max / 7.5). B is stored as rows of ``group`` values (the decoder reshapes it to A's rank); when its size is
    not a multiple of ``group``, one scale per row of B instead."""
    E = w.float() - dequantize_entry(t)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    r = min(rank, S.numel())
    At = (U[:, :r] * S[:r][None, :]).T.contiguous()   # r x rows: stored transposed, as lqer() stores it
    s_a = (At.abs().amax().clamp_min(1e-10) / 1.5).to(torch.float16).float()
    q_a = torch.round(At / s_a).clamp_(-2, 1).to(torch.int8)
    B = Vh[:r].contiguous()
    rows = B.reshape(-1, group) if B.numel() % group == 0 else B
    s_b = (rows.abs().amax(dim=1).clamp_min(1e-10) / 7.5).to(torch.float16)
    q_b = torch.round(rows / s_b.float()[:, None]).clamp_(-8, 7).to(torch.int8)
    factors = [{"q": q_a, "scale": s_a.to(torch.float16).expand(r).clone(), "bits": 2},
               {"q": q_b, "scale": s_b, "bits": 4}]
    return {**t, "lqer": factors}


def error_norm(w: torch.Tensor, t: dict) -> float:
    """Frobenius norm of what quantizing w to t lost (the records rank LQER candidates by it)."""
    return float((w.float() - dequantize_entry(t)).norm())


# --- errors --------------------------------------------------------------------------------------
def weight_error(w: torch.Tensor, deq: torch.Tensor) -> tuple[float, float]:
    """(squared error, squared norm) of the weights."""
    w = w.float()
    return float((deq - w).pow(2).sum()), float(w.pow(2).sum())


def output_error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error tr(E H E^T) / tr(W H W^T): what GPTQ minimizes, scale-free."""
    H = H.float().cpu()
    E = deq - w.float()
    num = float(((E @ H) * E).sum())
    den = float(((w.float() @ H) * w.float()).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


# --- calibration -------------------------------------------------------------------------------
@torch.no_grad()
def collect_hessians(model, tokens: np.ndarray, seq_len: int, batch_seqs: int,
                     device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    """H = mean of x x^T over calibration tokens for every Linear's input (keyed by its weight's name),
    and for the tied embedding as the output head (its input: the final hidden states). Returns the
    Hessians (on ``device``) and the seconds it took."""
    t0 = time.perf_counter()
    model = model.to(device).eval()
    H: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in H:
                H[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                counts[name] = 0
            H[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(hook(f"{name}.weight")))
    n_seq = len(tokens) // seq_len
    if n_seq == 0:
        raise ValueError(f"calibration needs at least {seq_len} tokens, got {len(tokens)}")
    x_all = torch.as_tensor(np.asarray(tokens[:n_seq * seq_len], dtype=np.int64)).view(n_seq, seq_len)
    head = "embed.weight"
    try:
        for i in range(0, n_seq, batch_seqs):
            x = x_all[i:i + batch_seqs].to(device)
            h = model.hidden(x).reshape(-1, model.cfg.model_dim).float()
            if head not in H:
                H[head] = torch.zeros(h.shape[1], h.shape[1], device=h.device)
                counts[head] = 0
            H[head].addmm_(h.T, h)
            counts[head] += h.shape[0]
    finally:
        for hk in hooks:
            hk.remove()
    out = {k: v / counts[k] for k, v in H.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0
