"""Checks of the stage configs' fields, run by their ``__post_init__``: a wrong value is one ValueError naming
the field (``train.seq_len must be an integer >= 1, not 0``), raised when the config is built, before any
stage runs. Light on purpose (no torch): the configs are built by the CLI and the flows before anything
heavy is needed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def choices(cfg: Any, prefix: str, allowed: dict[str, Iterable[str]], error: type = ValueError) -> None:
    """Each named string field must be one of its allowed values."""
    for name, values in allowed.items():
        values = tuple(values)
        v = getattr(cfg, name)
        if v not in values:
            raise error(f"{prefix}.{name} must be one of {', '.join(values)}, not {v!r}")


def ints(cfg: Any, prefix: str, names: Iterable[str], at_least: int = 0, error: type = ValueError) -> None:
    """Each named field must be an integer (not a bool) of at least ``at_least``."""
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < at_least:
            raise error(f"{prefix}.{name} must be an integer >= {at_least}, not {v!r}")


def reals(cfg: Any, prefix: str, names: Iterable[str], lo: float = 0.0, hi: float = math.inf,
          hi_open: bool = False, lo_open: bool = False, error: type = ValueError) -> None:
    """Each named field must be a finite number in [lo, hi] (an end left open with ``lo_open``/``hi_open``)."""
    for name in names:
        v = getattr(cfg, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
            raise error(f"{prefix}.{name} must be a finite number in {span}, not {v!r}")


def need(ok: bool, message: str, error: type = ValueError) -> None:
    if not ok:
        raise error(message)
