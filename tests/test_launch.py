"""The launcher's waits: a stage thread other than the main one stops its workers when golf's main thread ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_wait_in_a_stage_thread_ends_with_the_main_thread(tmp_path):
    """Signals reach only the main thread: when it ends (a stop, an error), a flow's concurrent stage waiting on
    its workers in another thread must stop them, or Python's exit waits for them to finish on their own."""
    script = tmp_path / "main_ends.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from runtime.launch import wait_or_stop
        workers = subprocess.Popen(["sleep", "120"], start_new_session=True)
        print(workers.pid, flush=True)
        threading.Thread(target=wait_or_stop, args=(workers, 5.0)).start()
        time.sleep(0.5)  # the main thread ends here
    """))
    t = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t < 20, "the process waited for its workers instead of stopping them"
    assert "GolfStopping" in done.stderr
    pid = int(done.stdout.split()[0])
    try:
        alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        alive = False
    if alive:
        os.kill(pid, 9)
    assert not alive
