"""The pipeline end to end through a real Prefect flow (temporary server), and its cache behaviour."""

from __future__ import annotations

import dataclasses

from artifacts import ArtifactStore
from golf.config import apply_overrides


def test_flow_runs_end_to_end_then_reruns_only_what_changed(tmp_path, fast_cfg):
    from flows.pipeline import pipeline_flow

    store = ArtifactStore(tmp_path / "store")
    first = pipeline_flow(config=dataclasses.asdict(fast_cfg), store_root=str(store.root))
    stages = [s["stage"] for s in first]
    assert stages == ["tokenize", "train", "average", "quantize", "eval", "compliance"]
    assert not any(s["cached"] for s in first)
    by = {s["stage"]: s for s in first}
    assert 1.0 < by["eval"]["metrics"]["val_bpb"] < 5.0
    assert by["compliance"]["metrics"]["verdict"] == "PASS"
    assert by["train"]["metrics"]["steps"] == 8
    for s in first:  # every task returned a small manifest, and the store holds the artifact
        assert store.exists(s["key"]) and store.verify(s["key"]) == []

    # the same config again: everything from the store
    again = pipeline_flow(config=dataclasses.asdict(fast_cfg), store_root=str(store.root))
    assert all(s["cached"] for s in again)
    assert [s["key"] for s in again] == [s["key"] for s in first]

    # a quantize setting: upstream cached, quantize and everything after it rebuilt
    six = apply_overrides(fast_cfg, ["quantize.bits=6"])
    third = {s["stage"]: s for s in pipeline_flow(config=dataclasses.asdict(six), store_root=str(store.root))}
    assert [st for st, s in third.items() if s["cached"]] == ["tokenize", "train", "average"]
    for st in ("quantize", "eval", "compliance"):
        assert not third[st]["cached"] and third[st]["key"] != by[st]["key"]
    assert third["quantize"]["metrics"]["weights_bytes"] < by["quantize"]["metrics"]["weights_bytes"]

    # --force reruns one stage (same key) and what follows is served from the store again
    forced = {s["stage"]: s for s in pipeline_flow(config=dataclasses.asdict(fast_cfg), store_root=str(store.root),
                                                   force=["average"])}
    assert not forced["average"]["cached"] and forced["average"]["key"] == by["average"]["key"]
    assert forced["train"]["cached"] and forced["quantize"]["cached"]


def test_store_is_the_source_of_truth_without_prefect(tmp_path, fast_cfg):
    """The plain runner and the flow agree on keys; the store alone decides what is cached."""
    from golf.pipeline import run_pipeline
    store = ArtifactStore(tmp_path / "store")
    keys = [r.artifact.key for r in run_pipeline(fast_cfg, store, until="train")]
    assert len(keys) == 2
    again = run_pipeline(fast_cfg, store, until="average")
    assert [r.cached for r in again] == [True, True, False]


def test_every_flow_and_stage_imports():
    import flows.pipeline  # noqa: F401
    from golf.pipeline import STAGES
    assert [s.name for s in STAGES] == ["tokenize", "train", "average", "quantize", "eval", "compliance"]
    for s in STAGES:
        assert dataclasses.is_dataclass(s.config)
        for role in s.inputs:
            assert role in [x.name for x in STAGES]
