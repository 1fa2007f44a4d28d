"""Scoring a token stream: per-target NLL over windows, sliding or not, documents isolated or not (shipped code).

The stream is tokens[0..N); target i is token i+1, predicted from the tokens before it. Windows start at
0, stride, 2*stride, ... and hold at most ``seq_len`` input tokens; each target is scored exactly once, by
the first window that reaches it, so with stride < seq_len every target after the first window has at
least seq_len - stride tokens of left context. stride = 0 means stride = seq_len (no overlap).

With document isolation the stream is cut at every BOS and each document is windowed on its own: the
document [a, b) (tokens[a] is its BOS) owns targets a..b-1, its tokens after BOS and the next document's
BOS, predicted from its own tokens only; its first target has the BOS alone as context.

A window is (first input token, number of inputs, first scored target, end of scored targets). Windows
are batched by length (on CUDA padded up to a few fixed shapes, so compiled kernels are reused); padding
goes after a window's tokens, where a causal model cannot see it. Only the scored positions are projected
to logits, and the softmax is taken in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def window_plan(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, first scored offset) of every window over a stream of n_tokens tokens."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    n_targets = n_tokens - 1
    plan, scored, start = [], 0, 0
    while scored < n_targets:
        length = min(seq_len, n_targets - start)
        plan.append((start, length, scored - start))
        scored = start + length
        start += stride
    return plan


def document_spans(tokens: np.ndarray, bos: int) -> list[tuple[int, int]]:
    """(start, end) of each document; a stream that does not open with BOS opens with a partial document."""
    starts = np.flatnonzero(np.asarray(tokens) == bos).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [len(tokens)]))


def stream_windows(n_tokens: int, seq_len: int, stride: int,
                   spans: list[tuple[int, int]] | None = None) -> list[tuple[int, int, int, int]]:
    """Windows over the whole stream, or over each document of ``spans`` on its own; in stream order."""
    out = []
    for a, b in spans or [(0, n_tokens)]:
        n = min(b + 1, n_tokens) - a  # a document's inputs and targets: up to the next one's BOS
        out += [(a + s, ln, a + s + f, a + s + ln) for s, ln, f in window_plan(n, seq_len, stride)]
    return out


def padded_len(n: int, seq_len: int, fixed: bool) -> int:
    """The length a window of n inputs is batched at: exact, or a power of two >= 128 (FlexAttention's block;
    at most seq_len)."""
    return min(seq_len, max(128, 1 << (n - 1).bit_length())) if fixed else n


def make_batches(windows: list, seq_len: int, batch_seqs: int, fixed: bool = False) -> list[tuple[int, int, list]]:
    """(padded length, rows, windows): windows of one padded length, batch_seqs * seq_len tokens a batch."""
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(padded_len(w[1], seq_len, fixed), []).append(w)
    out = []
    for T, ws in sorted(groups.items(), reverse=True):
        per = max(1, batch_seqs * seq_len // T)
        out += [(T, per if fixed else min(per, len(ws) - i), ws[i:i + per]) for i in range(0, len(ws), per)]
    return out


def window_tensors(tokens: torch.Tensor, T: int, rows: int, windows: list):
    """Inputs, targets (rows, T) and the mask of scored positions of a batch of windows."""
    x = torch.zeros(rows, T, dtype=torch.long)
    y = torch.zeros(rows, T, dtype=torch.long)
    keep = torch.zeros(rows, T, dtype=torch.bool)
    for r, (s, n, a, b) in enumerate(windows):
        x[r, :n] = tokens[s:s + n]
        y[r, :n] = tokens[s + 1:s + n + 1]
        keep[r, a - s:b - s] = True
    return x, y, keep


def kept_logits(model, x: torch.Tensor, keep: torch.Tensor, hidden=None) -> torch.Tensor:
    """Logits (float32) at the kept positions, in row-major order; ``hidden``: the forward to take hidden states
    from (the model's own by default)."""
    return model.project((hidden or model.hidden)(x)[keep])


def kept_nll(model, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """float64 NLL of the kept positions, in row-major order. A model without ``hidden``/``project``
    (a test double) is scored through its ``token_nll``."""
    if not hasattr(model, "project"):
        return model.token_nll(x, y)[keep].double()
    h, t = model.hidden(x)[keep], y[keep]
    return torch.cat([F.cross_entropy(model.project(h[i:i + rows]).double(), t[i:i + rows], reduction="none")
                      for i in range(0, len(t), rows)])


@torch.no_grad()
def score_batches(model, tokens: torch.Tensor, batches: list, device, nll: np.ndarray, on_batch=None) -> None:
    """Write the NLL of every window's scored targets into ``nll``; ``on_batch(windows)`` after each batch."""
    device = torch.device(device)
    for T, rows, ws in batches:
        x, y, keep = (t.to(device, non_blocking=True) for t in window_tensors(tokens, T, rows, ws))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = kept_nll(model, x, y, keep).cpu().numpy()
        i = 0
        for _, _, a, b in ws:
            nll[a:b] = out[i:i + b - a]
            i += b - a
        if on_batch is not None:
            on_batch(ws)


def score_stream(model, tokens: np.ndarray, seq_len: int, stride: int = 0, batch_seqs: int = 32,
                 device: str | torch.device = "cpu", progress=None, doc_isolation: bool = False,
                 bos_id: int | None = None) -> np.ndarray:
    """Per-target NLL in nats (float64, length len(tokens) - 1), in stream order; ``progress(n)`` gets
    the number of targets each batch scored."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if bos_id is None:
        bos_id = model.cfg.bos_id if hasattr(model, "cfg") else 1
    spans = document_spans(tokens, bos_id) if doc_isolation else None
    windows = stream_windows(len(tokens), seq_len, stride, spans)
    nll = np.full(len(tokens) - 1, np.nan)
    fixed = torch.device(device).type == "cuda"
    score_batches(model, torch.as_tensor(tokens), make_batches(windows, seq_len, batch_seqs, fixed), device, nll,
                  None if progress is None else lambda ws: progress(sum(b - a for _, _, a, b in ws)))
    return nll
