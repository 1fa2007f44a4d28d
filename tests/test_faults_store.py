"""Faults of the store and the runner: corrupted inputs, forced rebuilds, hand-run keys, shared logs, leftovers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifacts import ArtifactStore, Stage, run_stage
from golf.cli import main

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LogConfig:
    label: str = "a"
    lines: int = 20


def chatty_build(cfg, inputs, ctx):
    log = logging.getLogger("golf.toy")
    for i in range(cfg.lines):
        log.info("line %d of build %s", i, cfg.label)
        time.sleep(0.005)
    (ctx.dir / "out.txt").write_text(cfg.label)
    return {}


CHATTY = Stage(name="toy", config=LogConfig, inputs=(), build=chatty_build, module="gpt.bpb")
CHILD = Stage(name="child", config=LogConfig, inputs=("toy",), build=chatty_build, module="gpt.bpb")


def _copy_store(pipeline_run, tmp_path) -> ArtifactStore:
    """A private copy of the shared run's store, to damage without touching the other tests' artifacts."""
    store, _, _ = pipeline_run
    dst = tmp_path / "store"
    shutil.copytree(store.root / "objects", dst / "objects")
    return ArtifactStore(dst)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# --- corrupted inputs -------------------------------------------------------------------------------
def test_a_flipped_byte_in_an_input_stops_the_stage_naming_artifact_and_file(pipeline_run, tmp_path, capsys):
    store = _copy_store(pipeline_run, tmp_path)
    _, cfg, results = pipeline_run
    train = store.get(results["train"].artifact.key)
    _flip(train.path / "final.pt", train.file("final.pt").stat().st_size // 2)
    from artifacts.store import ArtifactCorrupt
    from golf.config import apply_overrides
    from golf.pipeline import run_pipeline
    before = set(store.keys())  # the shared store may hold other tests' averages too
    with pytest.raises(ArtifactCorrupt, match=rf"{train.key} \(train\).*final\.pt: sha256"):
        run_pipeline(apply_overrides(cfg, ["average.method=final"]), store)
    assert set(store.keys()) == before  # nothing was built from the damaged input


def test_a_flipped_val_token_fails_compliance_input_checks_through_the_cli(pipeline_run, tmp_path, capsys):
    store = _copy_store(pipeline_run, tmp_path)
    _, _, results = pipeline_run
    tok = store.get(results["tokenize"].artifact.key)
    shard = next(n for n in tok.files() if "_val_" in n)
    _flip(tok.path / shard, 2000)
    # a new compliance config: compliance reads the tokenize artifact again
    code = main(["--store", str(store.root), "run", "--no-prefect", "--set", "compliance.leak_pairs=3",
                 *[f"--set={s}" for s in __import__("conftest").FAST]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("golf: error: input artifact tokenize-") and shard in err[-1]


def test_submit_refuses_an_artifact_whose_files_fail_verification(pipeline_run, tmp_path):
    from golf.submit import SubmitError, submit
    store = _copy_store(pipeline_run, tmp_path)
    _, _, results = pipeline_run
    q = store.get(results["quantize"].artifact.key)
    _flip(q.path / "weights.bin", 100)
    out = tmp_path / "records" / "x"
    with pytest.raises(SubmitError, match=rf"{q.key} fails verification \(weights\.bin"):
        submit(store, [results["compliance"].artifact.key], out, "x", "me")
    assert not out.exists()


def test_verifying_an_input_hashes_it_once_per_process(store, monkeypatch):
    from artifacts import runner
    parent = run_stage(CHATTY, LogConfig(lines=1), {}, store).artifact
    calls = []
    real = runner.file_problems
    monkeypatch.setattr(runner, "file_problems", lambda root, listed: calls.append(sorted(listed)) or real(root, listed))
    run_stage(CHILD, LogConfig("b", 1), {"toy": parent}, store)
    run_stage(CHILD, LogConfig("c", 1), {"toy": parent}, store)
    assert calls[0] == ["log.txt", "out.txt"] and calls[1] == []


# --- forced rebuilds ------------------------------------------------------------------------------------
def test_force_rebuilds_everything_that_reads_the_forced_stage(pipeline_run, tmp_path):
    from golf.pipeline import run_pipeline
    store = _copy_store(pipeline_run, tmp_path)
    _, cfg, results = pipeline_run
    res = run_pipeline(cfg, store, force=["train"], until="average")
    assert [r.cached for r in res] == [True, False, False]
    train = res[1].artifact
    assert res[2].artifact.manifest["input_content"]["train"] == train.content_digest
    assert res[2].artifact.key != results["average"].artifact.key
    # a later plain run reads the rebuilt train: nothing downstream comes from the old weights
    later = {r.artifact.stage: r for r in run_pipeline(cfg, store)}
    assert later["average"].cached and later["average"].artifact.key == res[2].artifact.key
    for stage in ("quantize", "eval", "compliance"):
        assert not later[stage].cached and later[stage].artifact.key != results[stage].artifact.key


def test_content_digest_ignores_the_build_log(store):
    a = run_stage(CHATTY, LogConfig(lines=1), {}, store).artifact
    b = run_stage(CHATTY, LogConfig(lines=1), {}, store, force=True).artifact
    assert a.key == b.key and a.manifest["files"]["log.txt"] != b.manifest["files"]["log.txt"]
    assert a.content_digest == b.content_digest  # same outputs: downstream keys stay


# --- a stage run by hand --------------------------------------------------------------------------------
def test_a_stage_run_by_hand_gets_the_pipelines_key(pipeline_run):
    """`golf stage quantize` (was `python -m stages.quantize`, whose code digest was of nothing) shares the key,
    given the run's eval settings (FAST's eval.max_tokens), which its train_gpt.py embeds."""
    store, _, results = pipeline_run
    r = results
    out = subprocess.run([sys.executable, "-m", "golf.cli", "--store", str(store.root), "stage", "quantize",
                          "--input", f"average={r['average'].artifact.key}",
                          "--input", f"tokenize={r['tokenize'].artifact.key}", "--eval-set", "max_tokens=8192"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["key"] == r["quantize"].artifact.key and summary["cached"]


# --- logs of concurrent builds -------------------------------------------------------------------------
def test_concurrent_builds_log_only_their_own_lines(store):
    labels = ["alpha", "beta", "gamma"]
    threads = [threading.Thread(target=run_stage, args=(CHATTY, LogConfig(lb), {}, store)) for lb in labels]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arts = [a for a in store.list() if a.stage == "toy"]
    assert len(arts) == 3
    for a in arts:
        label = (a.path / "out.txt").read_text()
        text = a.file("log.txt").read_text()
        assert text.count(f"of build {label}") == 20
        assert not any(f"of build {other}" in text for other in labels if other != label), label


# --- leftovers, listings, keys --------------------------------------------------------------------------
def test_a_killed_builds_tmp_folder_is_removed_by_the_next_build_unless_it_is_still_building(store):
    tmp = store.root / "tmp"
    dead = tmp / "quantize-0123456789abcdef0123.4242.deadbeef"
    alive = tmp / "train-aaaaaaaaaaaaaaaaaaaa.77.cafecafe"
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / "half.bin").write_bytes(b"x")
    (store.root / "locks").mkdir(parents=True)
    # another process is building train-aaaa...: it holds that key's lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True);"
        " time.sleep(60)"), str(store.root / "locks" / "train-aaaaaaaaaaaaaaaaaaaa.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run_stage(CHATTY, LogConfig(lines=1), {}, store)
        assert not dead.exists() and alive.exists()
    finally:
        holder.kill()
        holder.wait()
    run_stage(CHATTY, LogConfig("z", lines=1), {}, store)
    assert not alive.exists() and store.incomplete() == []


def test_artifacts_ls_shows_broken_and_damaged_artifacts(store, capsys):
    good = run_stage(CHATTY, LogConfig(lines=1), {}, store).artifact
    other = run_stage(CHATTY, LogConfig("b", lines=1), {}, store).artifact
    (other.path / "out.txt").write_text("longer than before")
    bad = store.objects / "eval-00000000000000000000"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    named = store.objects / "train-11111111111111111111"
    named.mkdir()
    (named / "manifest.json").write_text(json.dumps({"key": "train-22222222222222222222", "stage": "train"}))
    assert main(["--store", str(store.root), "artifacts", "ls"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert " ok " in rows[good.key] and " damaged " in rows[other.key] and "out.txt" in rows[other.key]
    assert " broken " in rows[bad.name] and "not valid JSON" in rows[bad.name]
    assert " broken " in rows[named.name] and "train-22222222222222222222" in rows[named.name]


@pytest.mark.parametrize("action", ["show", "verify", "path"])
@pytest.mark.parametrize("key", ["", "../objects/x", "/etc", ".hidden"])
def test_artifact_commands_refuse_empty_keys_and_paths_with_exit_2(store, capsys, action, key):
    art = run_stage(CHATTY, LogConfig(lines=1), {}, store).artifact
    link = store.objects / ".." / "objects" / "x"
    os.symlink(art.path, link)  # `../objects/x` would resolve if keys were paths
    capsys.readouterr()
    code = main(["--store", str(store.root), "artifacts", action, key])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("golf: error:")


def test_a_misspelt_until_is_refused_before_prefect_starts(store, capsys):
    t0 = time.perf_counter()
    code = main(["--store", str(store.root), "run", "--until", "trian"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [err[0]] and "unknown stage 'trian'" in err[0]
    assert time.perf_counter() - t0 < 5  # no temporary Prefect server was started
    assert not (store.root / "objects").exists()
