"""Progress on long work, on a terminal and in a log file alike.

On a terminal the stages show tqdm bars. Where stderr is not a terminal (a log file, ``tee``, a Prefect
worker, a scheduler's job) tqdm stays silent, and ten minutes of training used to leave two lines in the
log. There a ``LogProgress`` takes the bar's place and writes one log line every ``every_s`` seconds (and
one at the end) with the same figures: done / total, rate, and the bar's postfix (step, loss, tokens/s).
"""

from __future__ import annotations

import logging
import sys
import time


class LogProgress:
    """The part of tqdm's interface the stages use, written as periodic log lines."""

    def __init__(self, log: logging.Logger, desc: str, total: float | None = None, unit: str = "it",
                 initial: float = 0.0, every_s: float = 30.0):
        self.log, self.desc, self.total, self.unit, self.every_s = log, desc, total, unit, every_s
        self.n = initial
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()
        self.n0 = initial
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh(force=False)

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        self.postfix = s

    def refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.t0
        done = f"{_fmt(self.n)}/{_fmt(self.total)} {self.unit}" if self.total else f"{_fmt(self.n)} {self.unit}"
        if self.total:
            done += f" ({self.n / self.total:.0%})"
        rate = (self.n - self.n0) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {done}", f"{elapsed:.0f} s"]
        if self.unit != "s" and rate:
            parts.append(f"{_fmt(rate)} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.refresh(force=True)


def _fmt(x: float | None) -> str:
    if x is None:
        return "?"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() or abs(x) >= 10 else f"{x:.1f}"


def progress_bar(log: logging.Logger, desc: str, total: float | None = None, unit: str = "it",
                 enabled: bool = True, every_s: float = 30.0, **tqdm_kwargs):
    """A tqdm bar on a terminal, a LogProgress elsewhere, a silent tqdm where ``enabled`` is False."""
    from tqdm import tqdm
    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=True, **tqdm_kwargs)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs)
    return LogProgress(log, desc, total, unit, initial=tqdm_kwargs.get("initial", 0.0), every_s=every_s)
