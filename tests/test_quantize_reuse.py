"""An eval-only change re-keys quantize (train_gpt.py embeds the eval, and its bytes count), but its weights are
those of the artifact the same settings made before: golf run takes weights.bin from there instead of running GPTQ
again, assembles the new code, and counts its bytes. Anything that changes the weights, a damaged source, fit mode
or reuse_weights=false quantizes anew."""

from __future__ import annotations

import pytest

import stages.quantize as Q
from artifacts import ArtifactStore
from golf.config import apply_overrides, preset
from golf.pipeline import run_pipeline
from tests.conftest import FAST


def _run(store, extra):
    return {r.artifact.stage: r for r in run_pipeline(apply_overrides(preset("tiny"), FAST + extra), store)}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("reuse") / "store")
    return store, _run(store, [])


def _no_gptq(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("quantize_weights ran: the weights were not reused")
    monkeypatch.setattr(Q, "quantize_weights", refuse)


def test_an_eval_only_change_reuses_the_weights_and_scores_the_same(first, monkeypatch):
    store, before = first
    _no_gptq(monkeypatch)
    after = _run(store, ["eval.batch_seqs=16", "quantize.fail_over_cap=false"])  # the eval and the cap check only
    q0, q1 = before["quantize"].artifact, after["quantize"].artifact
    assert not after["quantize"].cached and q1.key != q0.key and q1.metrics["weights_from"] == q0.key
    assert q1.file("weights.bin").read_bytes() == q0.file("weights.bin").read_bytes()
    # the new code is this run's (its eval embedded) and its bytes are what counts
    assert q1.file("shipped_code.py").read_text() != q0.file("shipped_code.py").read_text()
    import json
    size = json.loads(q1.file("size.json").read_text())
    assert size["code_bytes"] == len(q1.file("shipped_code.py").read_text().encode()) == q1.metrics["code_bytes"]
    assert size["artifact_bytes"] == size["weights_bytes"] + size["code_bytes"] == q1.metrics["artifact_bytes"]
    assert '"batch_seqs": 16' in q1.file("program.json").read_text()
    assert after["eval"].artifact.metrics["val_bpb"] == pytest.approx(before["eval"].artifact.metrics["val_bpb"],
                                                                      abs=1e-9)
    assert store.verify(q1.key) == []
    assert after["compliance"].artifact.metrics["verdict"] == before["compliance"].artifact.metrics["verdict"]


@pytest.mark.parametrize("extra", [["quantize.bits=6"], ["quantize.reuse_weights=false", "eval.batch_seqs=8"],
                                   ["quantize.mode=fit", "eval.batch_seqs=8"]])
def test_what_changes_the_weights_or_asks_for_it_quantizes_anew(first, extra, monkeypatch):
    store, _ = first
    ran = []
    real = Q.quantize_weights
    monkeypatch.setattr(Q, "quantize_weights", lambda *a, **k: (ran.append(1), real(*a, **k))[1])
    q = _run(store, extra + ["quantize.fail_over_cap=false"])["quantize"].artifact
    assert ran and "weights_from" not in q.metrics


def test_a_damaged_source_is_not_reused(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    q0 = _run(store, [])["quantize"].artifact
    blob = q0.path / "weights.bin"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    ran = []
    real = Q.quantize_weights
    monkeypatch.setattr(Q, "quantize_weights", lambda *a, **k: (ran.append(1), real(*a, **k))[1])
    q1 = _run(store, ["eval.batch_seqs=16"])["quantize"].artifact
    assert ran and "weights_from" not in q1.metrics and store.verify(q1.key) == []


def test_force_quantizes_anew(first, monkeypatch):
    store, _ = first
    _run(store, ["eval.batch_seqs=12"])  # reused from the first run's weights
    ran = []
    real = Q.quantize_weights
    monkeypatch.setattr(Q, "quantize_weights", lambda *a, **k: (ran.append(1), real(*a, **k))[1])
    cfg = apply_overrides(preset("tiny"), FAST + ["eval.batch_seqs=12"])
    q = {r.artifact.stage: r for r in run_pipeline(cfg, store, force=["quantize"])}["quantize"].artifact
    assert ran and "weights_from" not in q.metrics
    assert "reuse_weights" not in q.file("program.json").read_text()  # not a setting of the run: not shipped


def test_gptq_reuse_carries_its_calibration_and_passes_compliance(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "store")
    gptq = ["quantize.method=gptq", "quantize.calib_seqs=4", "quantize.seq_len=256"]
    before = _run(store, gptq)
    _no_gptq(monkeypatch)
    after = _run(store, gptq + ["eval.batch_seqs=16"])
    q0, q1 = before["quantize"].artifact, after["quantize"].artifact
    assert q1.metrics["weights_from"] == q0.key
    assert q1.file("calibration.json").read_bytes() == q0.file("calibration.json").read_bytes()
    assert q1.metrics["calibration_seconds"] == q0.metrics["calibration_seconds"] > 0
    assert after["compliance"].artifact.metrics["verdict"] == before["compliance"].artifact.metrics["verdict"] == "PASS"


def test_the_fields_called_weight_independent_leave_the_blob_as_it_is(first):
    """WEIGHTS_INDEPENDENT is what reuse may differ in: changing any of them must not move a byte of the weights."""
    import dataclasses
    from gpt.averaging import load_averaged
    from gpt.quantization import WEIGHTS_INDEPENDENT, quantize_weights
    from tokenizing.dataset import Dataset
    store, before = first
    avg = before["average"].artifact
    model_cfg, state = load_averaged(avg.file("weights.pt"), avg.file("average.json"))
    shards = Dataset.open(before["tokenize"].artifact).shard_paths("train")
    base = Q.QuantizeConfig(**before["quantize"].artifact.config)
    blob = quantize_weights(state, model_cfg, base, shards, ("x", "x")).blob
    changed = {"ship_eval": '{"stride": 7}', "reuse_weights": not base.reuse_weights,
               "fail_over_cap": not base.fail_over_cap, "cap_bytes": base.cap_bytes * 2}
    assert set(changed) == set(WEIGHTS_INDEPENDENT)
    for name, value in changed.items():
        other = dataclasses.replace(base, **{name: value})
        assert quantize_weights(state, model_cfg, other, shards, ("y" * 99, "y" * 99)).blob == blob, name
