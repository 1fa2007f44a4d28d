"""Bits per byte exactly as the challenge defines it.

    bytes(y_t) = base_bytes[y_t] + (has_leading_space[y_t] and not is_boundary[y_{t-1}])
    val_bpb    = sum_t nll_t (nats) / ln 2 / sum_t bytes(y_t)

base_bytes is the UTF-8 length of the piece without its leading '▁'; byte-fallback pieces are one
byte; control, unknown and unused pieces are zero bytes and count as boundaries (so the space that
SentencePiece adds in front of a document's first word is not counted after BOS).
"""

from __future__ import annotations

import math

import numpy as np


def piece_tables(sp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base_bytes int64, has_leading_space bool, is_boundary bool), indexed by token id."""
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int64)
    space = np.zeros(n, dtype=bool)
    boundary = np.ones(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def token_bytes(tokens: np.ndarray, tables: tuple[np.ndarray, np.ndarray, np.ndarray],
                prev: np.ndarray | None = None) -> np.ndarray:
    """Byte count of each token in ``tokens`` given the token before each (``prev``).

    Without ``prev`` the tokens are taken as one contiguous stream whose first token follows a boundary.
    """
    base, space, boundary = tables
    tokens = np.asarray(tokens, dtype=np.int64)
    if prev is None:
        prev_boundary = np.concatenate([[True], boundary[tokens[:-1]]]) if len(tokens) else np.zeros(0, bool)
    else:
        prev_boundary = boundary[np.asarray(prev, dtype=np.int64)]
    return base[tokens] + (space[tokens] & ~prev_boundary)


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise ValueError("cannot compute bits per byte over zero bytes")
    return float(nll_nats_sum) / math.log(2) / float(n_bytes)
