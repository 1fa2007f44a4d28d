"""Progress where no terminal is: periodic log lines with the bar's figures."""

from __future__ import annotations

import logging

from gpt.progress import LogProgress, progress_bar


def test_log_progress_writes_the_figures_at_its_interval(caplog):
    log = logging.getLogger("golf.test_progress")
    with caplog.at_level("INFO", logger="golf.test_progress"):
        bar = LogProgress(log, "eval quantized", total=2_000_000, unit="tok", every_s=3600)
        bar.update(500_000)  # inside the interval: nothing yet
        assert caplog.records == []
        bar.set_postfix_str("step 7 loss 3.1000")
        bar.every_s = 0
        bar.update(500_000)
        bar.close()
        bar.close()  # once only
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("eval quantized: 1.00M/2.00M tok (50%)") and lines[0].endswith("step 7 loss 3.1000")
    assert "tok/s" in lines[0]


def test_progress_bar_is_a_log_where_stderr_is_no_terminal(monkeypatch):
    import sys
    log = logging.getLogger("golf.test_progress")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress_bar(log, "x", total=10), LogProgress)
    assert not isinstance(progress_bar(log, "x", total=10, enabled=False), LogProgress)  # other ranks: silent
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not isinstance(progress_bar(log, "x", total=10), LogProgress)
