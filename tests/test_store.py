"""The artifact store and the stage runner: keys, atomic commits, races, verification."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifacts import ArtifactStore, Stage, StoreError, compute_key, plan_key, run_stage
from artifacts.runner import code_digest, code_files


@dataclass(frozen=True)
class ToyConfig:
    value: int = 1
    label: str = "a"


def toy_build(cfg, inputs, ctx):
    (ctx.dir / "out.txt").write_text(f"{cfg.value}:{cfg.label}:{sorted(a.key for a in inputs.values())}")
    return {"value": cfg.value}


TOY = Stage(name="toy", config=ToyConfig, inputs=(), build=toy_build, module="gpt.bpb")
TOY_CHILD = Stage(name="child", config=ToyConfig, inputs=("toy",), build=toy_build, module="gpt.bpb")


def test_key_changes_exactly_with_its_ingredients():
    base = compute_key("quantize", {"bits": 8}, "code1", {"average": "average-1"})
    assert base == compute_key("quantize", {"bits": 8}, "code1", {"average": "average-1"})
    assert base.startswith("quantize-")
    variants = [
        compute_key("quantize", {"bits": 6}, "code1", {"average": "average-1"}),
        compute_key("quantize", {"bits": 8}, "code2", {"average": "average-1"}),
        compute_key("quantize", {"bits": 8}, "code1", {"average": "average-2"}),
        compute_key("eval", {"bits": 8}, "code1", {"average": "average-1"}),
        compute_key("quantize", {"bits": 8}, "code1", {"average": "average-1"}, {"docs": "x"}),
    ]
    assert len({base, *variants}) == 6
    # key order in the config does not matter
    assert compute_key("s", {"a": 1, "b": 2}, "c", {}) == compute_key("s", {"b": 2, "a": 1}, "c", {})


def test_upstream_change_propagates_downstream_only(store):
    a1 = run_stage(TOY, ToyConfig(1), {}, store).artifact
    a2 = run_stage(TOY, ToyConfig(2), {}, store).artifact
    assert a1.key != a2.key
    k1, _ = plan_key(TOY_CHILD, ToyConfig(), {"toy": a1})
    k2, _ = plan_key(TOY_CHILD, ToyConfig(), {"toy": a2})
    assert k1 != k2
    # changing the child's own config changes the child's key but not the parent's
    k3, _ = plan_key(TOY_CHILD, ToyConfig(label="b"), {"toy": a1})
    assert k3 not in (k1, k2)
    assert run_stage(TOY, ToyConfig(1), {}, store).cached


def test_code_digest_follows_the_modules_a_stage_imports():
    files = code_files("stages.quantize")
    # quantize imports the core's quantization (which imports averaging, model, gptq, the codec) and the shipped
    # program's assembly (which imports train_gpt.py's entry, and through it the training loop and the eval)
    for module in ("stages.quantize", "gpt.quantization", "gpt.averaging", "gpt.model", "gpt.quant",
                   "shipping.assemble", "gpt.program", "gpt.training", "gpt.evaluation", "gpt.shipped_eval",
                   "stages", "gpt", "tokenizing.dataset"):
        assert module in files, module
    assert "stages.train" not in files and "stages.compliance" not in files and "stages.evaluate" not in files
    assert "stages.train" in code_files("stages.train") and "gpt.training" in code_files("stages.train")
    d1, _ = code_digest("stages.quantize")
    assert d1 == code_digest("stages.quantize")[0]
    assert d1 != code_digest("stages.tokenize")[0]


def test_code_change_changes_the_key(tmp_path, monkeypatch):
    pkg = tmp_path / "stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "toystage.py").write_text("from .helper import X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in list(__import__("sys").modules) if m == "stages" or m.startswith("stages.")]:
        monkeypatch.delitem(__import__("sys").modules, m)
    stage = dataclasses.replace(TOY, module="stages.toystage")
    before, _ = plan_key(stage, ToyConfig(), {})
    (pkg / "helper.py").write_text("X = 2\n")  # a change in an imported module, not the stage's own file
    after, _ = plan_key(stage, ToyConfig(), {})
    assert before != after


def test_commit_is_atomic_and_failures_leave_nothing(store):
    def failing(cfg, inputs, ctx):
        (ctx.dir / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("boom")

    stage = dataclasses.replace(TOY, build=failing)
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(stage, ToyConfig(), {}, store)
    assert store.keys() == []
    assert store.incomplete() == []  # the temporary directory is gone too


def test_directory_without_manifest_is_not_an_artifact(store):
    res = run_stage(TOY, ToyConfig(), {}, store)
    (res.artifact.path / "manifest.json").unlink()
    assert not store.exists(res.artifact.key)
    assert res.artifact.key not in store.keys()
    assert store.incomplete()  # listed as incomplete, not as an artifact
    again = run_stage(TOY, ToyConfig(), {}, store)  # and a rerun rebuilds it in place
    assert not again.cached and store.exists(again.artifact.key)


def test_manifest_records_identity_files_and_environment(store):
    art = run_stage(TOY, ToyConfig(value=7), {}, store).artifact
    m = json.loads((art.path / "manifest.json").read_text())
    for field in ("schema_version", "stage", "key", "config", "code_digest", "git", "inputs", "files",
                  "metrics", "environment", "started_at", "finished_at", "duration_s"):
        assert field in m, field
    assert m["config"] == {"value": 7, "label": "a"}
    assert m["metrics"] == {"value": 7}
    assert set(m["files"]) == {"out.txt", "log.txt"}
    assert m["files"]["out.txt"]["bytes"] == (art.path / "out.txt").stat().st_size
    assert "python" in m["environment"] and "world_size" in m["environment"]


def test_verify_detects_a_flipped_byte(store):
    art = run_stage(TOY, ToyConfig(), {}, store).artifact
    assert store.verify(art.key) == []
    p = art.path / "out.txt"
    data = bytearray(p.read_bytes())
    data[0] ^= 0x01
    p.write_bytes(bytes(data))
    problems = store.verify(art.key)
    assert len(problems) == 1 and "out.txt" in problems[0] and "sha256" in problems[0]
    (art.path / "extra.bin").write_bytes(b"1")
    assert any("not listed" in p for p in store.verify(art.key))


def _race(root: str, value: int, barrier) -> str:
    store = ArtifactStore(root)
    barrier.wait()
    res = run_stage(TOY, ToyConfig(value), {}, store)
    return res.artifact.key


def test_two_builders_of_one_key_do_not_corrupt_each_other(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        keys = pool.starmap(_race, [(str(tmp_path), 3, barrier)] * 4)
    store = ArtifactStore(tmp_path)
    assert len(set(keys)) == 1
    assert store.keys() == [keys[0]]
    assert store.verify(keys[0]) == []
    assert store.incomplete() == []


def test_prefix_resolution_and_errors(store):
    art = run_stage(TOY, ToyConfig(), {}, store).artifact
    assert store.resolve(art.key[:10]) == art.key
    with pytest.raises(StoreError, match="no artifact"):
        store.get("nothing-here")
    (art.path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.get(art.key)


def test_store_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GOLF_STORE", str(tmp_path / "elsewhere"))
    assert ArtifactStore().root == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv("GOLF_STORE")
    assert ArtifactStore().root == (Path(os.getcwd()) / "golf-store").resolve()


def test_fields_marked_not_in_key_do_not_change_it():
    from stages import tokenize
    a, _ = plan_key(tokenize.STAGE, tokenize.TokenizeConfig(workers=1), {})
    b, _ = plan_key(tokenize.STAGE, tokenize.TokenizeConfig(workers=4), {})
    c, _ = plan_key(tokenize.STAGE, tokenize.TokenizeConfig(val_docs=61), {})
    assert a == b != c
