"""Scoring a token stream: per-token NLL with non-overlapping or sliding windows (shipped code).

The stream is tokens[0..N); targets are tokens[1..N). Windows start at 0, stride, 2*stride, ... and
cover at most ``seq_len`` inputs; each target is scored exactly once, by the first window that
reaches it, so with stride < seq_len every target after the first window has at least
seq_len - stride tokens of left context. stride = 0 means stride = seq_len (no overlap).
"""

from __future__ import annotations

import numpy as np
import torch


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


@torch.no_grad()
def score_stream(model, tokens: np.ndarray, seq_len: int, stride: int = 0, batch_seqs: int = 32,
                 device: str | torch.device = "cpu", progress=None) -> np.ndarray:
    """Per-target NLL in nats (float64, length len(tokens) - 1), in stream order."""
    tokens_t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    plan = window_plan(len(tokens_t), seq_len, stride)
    nll = np.empty(len(tokens_t) - 1, dtype=np.float64)
    use_bf16 = torch.device(device).type == "cuda"
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in plan:
        by_len.setdefault(w[1], []).append(w)
    for length, windows in by_len.items():
        for i in range(0, len(windows), batch_seqs):
            group = windows[i:i + batch_seqs]
            x = torch.stack([tokens_t[s:s + length] for s, _, _ in group]).to(device)
            y = torch.stack([tokens_t[s + 1:s + length + 1] for s, _, _ in group]).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = model.token_nll(x, y).double().cpu().numpy()
            for row, (s, _, first) in zip(out, group):
                nll[s + first:s + length] = row[first:]
            if progress is not None:
                progress(len(group))
    return nll
