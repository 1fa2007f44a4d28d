"""Shared fixtures: a temporary store, a fast variant of the tiny preset, and Prefect kept offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Prefect must see these before it is first imported, by any test.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="golf-prefect-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # its INFO lines at interpreter exit hit closed streams

DATA = Path(__file__).parent / "data"
FAST = [
    "train.max_steps=8", "train.max_seconds=120", "train.swa_every=2", "train.warmdown_frac=0.5",
    "train.resume_every_s=0", "average.heldout_tokens=2048", "eval.max_tokens=8192",
]


@pytest.fixture
def store(tmp_path):
    from artifacts import ArtifactStore
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def fast_cfg():
    """The tiny preset cut down to seconds: 8 training steps, 8K val tokens."""
    from golf.config import apply_overrides, preset
    return apply_overrides(preset("tiny"), FAST)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """One fast pipeline run without Prefect, shared by the tests that only read its artifacts."""
    from artifacts import ArtifactStore
    from golf.config import apply_overrides, preset
    from golf.pipeline import run_pipeline
    store = ArtifactStore(tmp_path_factory.mktemp("shared") / "store")
    cfg = apply_overrides(preset("tiny"), FAST)
    results = {r.artifact.stage: r for r in run_pipeline(cfg, store)}
    return store, cfg, results
