"""Original bytes per token of text tokenized through a reversible transform (tokenizing/transforms.py, CaseOps).

Kept out of gpt/bpb.py, which ships inside the artifact's code (every byte of it counts against the cap): the
shipped program scores transformed data with the byte sidecar it is given, as the records' scripts do. Here:
the rule the tokenize stage writes that sidecar by, and the eval stage checks it against.
"""

from __future__ import annotations

import numpy as np

from .bpb import token_bytes


def transformed_token_bytes(tokens: np.ndarray, tables: tuple[np.ndarray, np.ndarray, np.ndarray],
                            operator_ids, escape_id: int = -1) -> np.ndarray:
    """Original bytes per token of text tokenized through a reversible transform (tokenizing/transforms.py):
    the piece-table rule, except that a transform's operator token stands for no original byte, unless the
    escape before it makes it a literal character (then its own bytes). The stream starts at a document
    boundary (BOS), which no escape crosses.

    Which operators are escaped: in a run of consecutive escape tokens the 1st, 3rd, ... escape the token after
    them (the 2nd, 4th, ... are literal escape characters), so a token is escaped when the run of escapes just
    before it has odd length."""
    tokens = np.asarray(tokens, dtype=np.int64)
    out = token_bytes(tokens, tables)
    if not len(tokens):
        return out
    is_op = np.zeros(len(tables[0]), dtype=bool)
    is_op[np.asarray(operator_ids, dtype=np.int64)] = True
    esc = tokens == escape_id
    idx = np.arange(len(tokens))
    run_start = np.maximum.accumulate(np.where(esc & ~np.concatenate([[False], esc[:-1]]), idx, 0))
    live = esc & ((idx - run_start) % 2 == 0)  # an escape that makes the next token literal
    escaped = np.concatenate([[False], live[:-1]])
    out[is_op[tokens] & ~escaped] = 0
    return out
