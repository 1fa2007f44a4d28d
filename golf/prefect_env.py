"""Prefect settings for running offline on one machine; applied before prefect is first imported."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",                                   # no telemetry
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server takes ~15-20 s here
    "PREFECT_LOGGING_LEVEL": "WARNING",                   # stage progress is ours to print
    "PREFECT_UI_ENABLED": "false",
}


# With no PREFECT_API_URL, a temporary server runs as a child of golf (ensure_server), in golf's process group: a stop
# signal to the group (Ctrl-C, ``timeout``, a scheduler) ends it with golf, and Prefect's client then retried
# reporting the crash to the dead server for about a minute before golf could exit.
TEMPORARY_SERVER_DEFAULTS = {"PREFECT_CLIENT_MAX_RETRIES": "1"}


def configure_prefect() -> None:
    """Fill in the offline defaults without overriding anything the user has set."""
    if "prefect" in __import__("sys").modules:
        return
    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not _api_url_configured():
        for k, v in TEMPORARY_SERVER_DEFAULTS.items():
            os.environ.setdefault(k, v)


class PrefectServerError(RuntimeError):
    """The temporary Prefect server did not start (one line for the user)."""


_SERVER: subprocess.Popen | None = None  # the temporary server golf started, stopped when golf exits
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # as Prefect's


def ensure_server() -> str | None:
    """Before a command runs flows in this process: the temporary server's API URL, or None when the user names a
    server (PREFECT_API_URL, a profile), which is then used and nothing is started.

    Prefect would start the temporary server itself (a uvicorn subprocess) and stop it at exit, but a golf killed
    with SIGKILL stops nothing and the server ran on under PID 1. golf starts the same server (Prefect's own app,
    on a free loopback port) as its child, from the main thread, asking Linux for SIGTERM to it when golf dies
    (runtime.launch's parent-death signal, the mechanism that ties torchrun to golf); waits until it answers; and
    sets PREFECT_API_URL for this process. Call it from the main thread: the signal follows the thread that
    started the child."""
    global _SERVER
    configure_prefect()
    if _SERVER is not None and _SERVER.poll() is None:
        return os.environ["PREFECT_API_URL"]
    if _api_url_configured() or os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").lower() in ("0", "false"):
        return None
    for k, v in TEMPORARY_SERVER_DEFAULTS.items():
        os.environ.setdefault(k, v)
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120)
    deadline = time.monotonic() + timeout
    for _ in range(3):  # a port taken between choosing it and uvicorn binding it: uvicorn exits 3, try another
        port = _free_port()
        proc = _start_server(port)
        url = f"http://127.0.0.1:{port}/api"
        up = _wait_healthy(proc, url, deadline)
        if up is True:
            break
        if up is False:
            _stop(proc)
            raise PrefectServerError(f"the temporary Prefect server did not answer on {url} within {timeout:g} s "
                                     f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); or set PREFECT_API_URL to "
                                     f"a running server")
        if up != 3:
            raise PrefectServerError(f"the temporary Prefect server exited with code {up} while starting (see its "
                                     f"output above); or set PREFECT_API_URL to a running server")
    else:
        raise PrefectServerError("the temporary Prefect server found no free port on 127.0.0.1 (3 tries)")
    _SERVER = proc
    atexit.register(_stop, proc)  # registered before prefect's own exit hooks: runs after them, as Prefect's does
    os.environ["PREFECT_API_URL"] = url
    if "prefect" in sys.modules:  # settings are read when prefect is imported: read them again
        from prefect.context import refresh_global_settings_context
        refresh_global_settings_context()
    return url


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    import importlib.util
    from runtime.launch import die_with_parent_preexec
    site = Path(importlib.util.find_spec("prefect").submodule_search_locations[0]).parent  # no prefect import yet
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(site), "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent_preexec(signal.SIGTERM))


def _wait_healthy(proc: subprocess.Popen, url: str, deadline: float) -> bool | int:
    """True once ``url``/health answers 200, the server's exit code if it exits first, False at the deadline."""
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        try:
            with opener.open(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _api_url_configured() -> bool:
    """Whether a Prefect server is named, in the environment or in a profile (then it is not a temporary one)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        return "PREFECT_API_URL" in (home / "profiles.toml").read_text()
    except OSError:
        return False
