"""Prefect settings for running offline on one machine; applied before prefect is first imported."""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",                                   # no telemetry
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # the temporary server takes ~15-20 s here
    "PREFECT_LOGGING_LEVEL": "WARNING",                   # stage progress is ours to print
    "PREFECT_UI_ENABLED": "false",
}


def configure_prefect() -> None:
    """Fill in the offline defaults without overriding anything the user has set."""
    if "prefect" in __import__("sys").modules:
        return
    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)
