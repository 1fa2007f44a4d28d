"""Prefect settings for running offline on one machine; applied before prefect is first imported."""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",                                   # no telemetry
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server takes ~15-20 s here
    "PREFECT_LOGGING_LEVEL": "WARNING",                   # stage progress is ours to print
    "PREFECT_UI_ENABLED": "false",
}


# With no PREFECT_API_URL, Prefect runs a temporary server as a child of golf, in golf's process group: a stop
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


def _api_url_configured() -> bool:
    """Whether a Prefect server is named, in the environment or in a profile (then it is not a temporary one)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        return "PREFECT_API_URL" in (home / "profiles.toml").read_text()
    except OSError:
        return False
