"""One way to run a stage's workers under torchrun, and to make sure none of them outlives the stage.

torchrun starts each worker in a session of its own, so a signal sent to the process group that ran
``golf`` (a shell's Ctrl-C, ``timeout``, a scheduler stopping a job) never reaches the workers, and
torchrun itself can die without passing it on. Orphaned workers then keep the GPUs busy, go on writing
snapshots and checkpoints into the work directory that a resumed run is using, and hold the stage's
output pipe open. Three links close that gap:

* ``run_workers`` starts torchrun in a session of its own (so a terminal's Ctrl-C or ``timeout`` reaches
  only ``golf``), waits on it and, if the stage is interrupted (any exception, SIGINT, Prefect's
  termination), asks it to stop, then SIGKILLs it after ``grace_s`` (torchrun gives its workers 30 s);
* torchrun runs through this module (``python -m runtime.launch``), which asks Linux for SIGUSR2 when the
  ``golf`` thread that started it dies, whatever killed that one. SIGUSR2, from there or from
  ``run_workers``, becomes exactly one SIGTERM to torchrun, which passes it on to the workers (training
  then saves a snapshot at its next step boundary). One only: torchrun dies at once on a second SIGTERM
  while it waits for its workers (here it ignores a second one from elsewhere too), and Linux sends the
  parent-death signal again each time another thread of a multi-threaded parent exits;
* each worker calls ``die_with_launcher()`` first thing, which does the same for the worker: SIGKILL when
  torchrun dies. Nothing a worker holds outlives its coordinator usefully (its peers are gone with it).

Elsewhere than Linux the second and third links are missing and only the first holds.
"""

from __future__ import annotations

import ctypes
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("golf.launch")

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1
_STOP = signal.SIGUSR2  # "stop your workers": turned into one SIGTERM by the launcher
_LAUNCHER_PID = "GOLF_LAUNCHER_PID"  # torchrun's pid, as seen by its workers


class WorkersFailed(RuntimeError):
    """torchrun ended with a non-zero exit code."""


_PRCTL = []  # libc's prctl, looked up once


def _prctl():
    if not _PRCTL:
        _PRCTL.append(ctypes.CDLL(None, use_errno=True).prctl)
    return _PRCTL[0]


def _die_with_parent(sig: int, expected_parent: int | None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where that is not
    possible. If the parent is already gone (it died before the request), die now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _prctl()(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


def die_with_parent_preexec(sig: int):
    """A ``preexec_fn`` for subprocess.Popen: the child gets ``sig`` when the thread starting it dies (start it
    from the main thread: then when this process dies, SIGKILL included). None where Linux's parent-death
    signal is missing. prctl is looked up here, not between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        _prctl()
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    return lambda: _die_with_parent(sig, parent)


def die_with_launcher() -> None:
    """Called by a worker under torchrun before anything else: SIGKILL this worker when torchrun dies."""
    launcher = os.environ.get(_LAUNCHER_PID)
    if launcher:
        _die_with_parent(signal.SIGKILL, int(launcher))


def torchrun_command(module: str, nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "runtime.launch", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, "--worker", *args]


def run_workers(module: str, nproc: int, args: list[str], grace_s: float = 35.0) -> list[str]:
    """Run ``python -m module --worker ARGS`` in ``nproc`` processes under torchrun and wait for them.

    Returns the command (for the stage's records); raises WorkersFailed on a non-zero exit. Interrupted
    by anything, it stops torchrun (and through it every worker) before passing the interruption on."""
    cmd = torchrun_command(module, nproc, args)
    log.info("launching: %s", " ".join(cmd[:8]) + " ...")
    env = dict(os.environ, GOLF_PARENT_PID=str(os.getpid()))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    code = wait_or_stop(proc, grace_s)
    if code:
        raise WorkersFailed(f"torchrun ({nproc} processes of {module}) exited with code {code} (see the log above)")
    return cmd


class GolfStopping(RuntimeError):
    """golf's main thread ended (a stop signal, an error) while a stage thread waited on its workers."""


def wait_or_stop(proc: subprocess.Popen, grace_s: float) -> int:
    """Wait for ``proc``; stop it if this wait is interrupted. Signals reach only the main thread, so a
    wait in another thread (a flow's concurrent stage) also ends when the main thread has ended: Python
    then waits for this thread before exiting, and the workers would run on for as long as they like."""
    try:
        if threading.current_thread() is threading.main_thread():
            return proc.wait()
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if not threading.main_thread().is_alive():
                    raise GolfStopping("golf's main thread has ended: stopping this stage's workers") from None
    except BaseException:
        stop(proc, grace_s)
        raise


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Ask torchrun to stop its workers, wait up to ``grace_s``, then SIGKILL it: its workers follow it
    (die_with_launcher)."""
    if proc.poll() is not None:
        return
    log.warning("stopping torchrun (pid %d) and its workers", proc.pid)
    proc.send_signal(_STOP)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _torchrun_stops_once() -> None:
    """torchrun raises on every SIGTERM, and one raised while it waits for its stopping workers kills them
    before they have saved: a stop that arrives twice (golf and a scheduler, a cgroup kill) would lose the
    snapshot. Only the first SIGTERM counts; SIGINT and the rest pass as before."""
    try:
        from torch.distributed.elastic.multiprocessing import api
    except ImportError:
        return
    original = getattr(api, "_terminate_process_handler", None)
    if original is None:
        return
    seen = []

    def first_sigterm_only(signum, frame):
        if signum == signal.SIGTERM and seen:
            return
        seen.append(signum)
        original(signum, frame)

    api._terminate_process_handler = first_sigterm_only


def _launcher_main() -> None:
    """``python -m runtime.launch TORCHRUN_ARGS``: torchrun, bound to the life of the process that started it."""
    stopping = []

    def stop_once(signum, frame):
        if not stopping:
            stopping.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun's own handler: stop the workers, wait, exit

    signal.signal(_STOP, stop_once)
    parent = os.environ.pop("GOLF_PARENT_PID", None)
    _die_with_parent(_STOP, int(parent) if parent else None)
    os.environ[_LAUNCHER_PID] = str(os.getpid())
    _torchrun_stops_once()
    sys.argv = ["torchrun", *sys.argv[1:]]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _launcher_main()
