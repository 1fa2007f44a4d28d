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
