"""The train stage as a user runs it: on two processes (torchrun, gloo), and resumed after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from artifacts import run_stage
from golf.config import apply_overrides
from golf.pipeline import run_pipeline
from stages import tokenize


def losses(art):
    return [json.loads(line)["loss"] for line in art.file("metrics.jsonl").read_text().splitlines()]


def test_two_processes_follow_the_single_process_loss_curve(store, fast_cfg):
    """nproc=2 launches torchrun with gloo; the same global batch gives the same losses. It snapshots after
    every step: a collective (loaders, Muon's sharded state) that every rank must enter on the same step.
    One process cuts two micro-batches of 4,096 tokens a step, as two processes cut one each: the loader gives rank
    r of 2 the tokens of micro-batch r of 1 (an off-by-one in its slicing moves a rank's rows and its loss)."""
    one = apply_overrides(fast_cfg, ["train.max_steps=4", "train.micro_batch_tokens=4096"])
    two = apply_overrides(one, ["train.nproc=2", "train.resume_every_s=0.001"])
    a = {r.artifact.stage: r.artifact for r in run_pipeline(one, store, until="train")}["train"]
    b = {r.artifact.stage: r.artifact for r in run_pipeline(two, store, until="train")}["train"]
    assert a.key != b.key
    assert b.metrics["world_size"] == 2 and "runtime.launch" in b.file("launch.txt").read_text()
    # equal to the logged 5 decimals here; half the rows one token off (micro_batch_tokens=8192 on one process)
    # moves steps 3-4 by 4-7e-5
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)


def test_two_processes_clip_their_own_gradients_with_clip_scope_local(store, fast_cfg):
    """The records' per-GPU clip under torchrun: the first step's loss is the global clip's (same weights, same
    batch), the next ones differ once a clip that binds acts on each rank's own, noisier, gradient."""
    two = apply_overrides(fast_cfg, ["train.max_steps=3", "train.nproc=2", "train.grad_clip=0.05"])
    local = apply_overrides(two, ["train.clip_scope=local"])
    a = {r.artifact.stage: r.artifact for r in run_pipeline(two, store, until="train")}["train"]
    b = {r.artifact.stage: r.artifact for r in run_pipeline(local, store, until="train")}["train"]
    la, lb = losses(a), losses(b)
    assert b.metrics["world_size"] == 2 and la[0] == pytest.approx(lb[0], rel=1e-6)
    assert all(abs(x - y) > 1e-6 for x, y in zip(la[1:], lb[1:])), (la, lb)


def test_a_killed_run_resumes_from_its_last_snapshot(store):
    tok = run_stage(tokenize.STAGE, tokenize.TokenizeConfig(), {}, store).artifact
    cmd = [sys.executable, "-m", "golf.cli", "--store", str(store.root), "stage", "train", "--input", f"tokenize={tok.key}",
           "--set", "max_steps=60", "--set", "max_seconds=600", "--set", "resume_every_s=0.5",
           "--set", "swa_every=0", "--set", "batch_tokens=4096", "--set", "micro_batch_tokens=4096"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    snapshot = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list((store.root / "work").glob("train-*/resume.pt"))
        if found:
            snapshot = found[0]
            time.sleep(1.0)  # let it run past the snapshot
            break
        time.sleep(0.2)
    assert snapshot is not None, "no resume snapshot was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(k.startswith("train-") for k in store.keys())  # nothing half-written
    live = [json.loads(line) for line in (snapshot.parent / "metrics.live.jsonl").read_text().splitlines()]
    assert live and [m["step"] for m in live] == list(range(1, len(live) + 1))  # the steps so far, for a look
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    art = store.get(json.loads(rerun.stdout)["key"])
    assert art.manifest["resumed"]["from_step"] > 0
    assert art.metrics["steps"] == 60 and len(losses(art)) == 60


def _live_steps(store_root) -> int:
    found = list((store_root / "work").glob("train-*/metrics.live.jsonl"))
    return len(found[0].read_text().splitlines()) if found else 0


def test_a_stop_signal_saves_a_snapshot_at_the_step_boundary(store):
    """SIGTERM (a scheduler, timeout) or Ctrl-C: the step ends, a snapshot is saved, the stage fails with a
    message saying so, and the same command resumes from that step, not from an older periodic snapshot."""
    tok = run_stage(tokenize.STAGE, tokenize.TokenizeConfig(), {}, store).artifact
    cmd = [sys.executable, "-m", "golf.cli", "--store", str(store.root), "stage", "train", "--input", f"tokenize={tok.key}",
           "--set", "max_steps=30", "--set", "max_seconds=600", "--set", "resume_every_s=0",
           "--set", "swa_every=0", "--set", "batch_tokens=4096", "--set", "micro_batch_tokens=4096"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _live_steps(store.root) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert _live_steps(store.root) >= 3, "training never reached step 3"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "the same command resumes from it" in err, err[-2000:]
    snap = torch.load(next((store.root / "work").glob("train-*/resume.pt")), weights_only=False)
    assert 3 <= snap["step"] < 30
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    art = store.get(json.loads(rerun.stdout)["key"])
    assert art.manifest["resumed"]["from_step"] == snap["step"] and art.metrics["steps"] == 30


def _workers_of(store_root) -> list[int]:
    """Pids of the processes whose command line names this store and --worker: torchrun and its workers."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"--worker" in argv and any(str(store_root).encode() in a for a in argv):
                pids.append(int(d))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_worker_outlives_a_stopped_stage(store, sig):
    """torchrun starts workers in sessions of their own: a signal to golf alone used to leave them training
    on (and writing into the work directory a rerun resumes from). Now they end with the stage."""
    tok = run_stage(tokenize.STAGE, tokenize.TokenizeConfig(), {}, store).artifact
    cmd = [sys.executable, "-m", "golf.cli", "--store", str(store.root), "stage", "train", "--input", f"tokenize={tok.key}",
           "--set", "nproc=2", "--set", "max_steps=100000", "--set", "max_seconds=600", "--set", "resume_every_s=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(_workers_of(store.root)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(_workers_of(store.root)) == 3, "torchrun and its two workers never started"
        while not _live_steps(store.root) and time.time() < deadline:
            time.sleep(0.2)
        assert _live_steps(store.root), "training never reached its first step"
        proc.send_signal(sig)  # to the stage's process only, not its group
        proc.wait(timeout=60)
        deadline = time.time() + 45
        while _workers_of(store.root) and time.time() < deadline:
            time.sleep(0.2)
        assert _workers_of(store.root) == []
        # torchrun passed the stop on: the workers saved where they were (resume_every_s=0: no other snapshot)
        snap = torch.load(next((store.root / "work").glob("train-*/resume.pt")), weights_only=False)
        assert snap["step"] >= 1
    finally:
        for pid in _workers_of(store.root):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_stop_during_the_last_step_is_not_forgotten(store, monkeypatch, tmp_path):
    """A signal that lands after the last step's stop check (here: while its progress is shown) used to be
    dropped when the handlers were restored; the run went on as if nothing had been asked."""
    from gpt import training as train_stage
    from golf.config import preset
    from tokenizing.dataset import Dataset

    class SignallingBar:  # stands in for the progress bar: sends SIGTERM while step 5 is being shown
        n = 0

        def set_postfix_str(self, s):
            if s.startswith("step 5 "):
                os.kill(os.getpid(), signal.SIGTERM)

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train_stage, "progress_bar", lambda *a, **k: SignallingBar())
    handler_before = signal.getsignal(signal.SIGTERM)
    tok = run_stage(tokenize.STAGE, tokenize.TokenizeConfig(), {}, store).artifact
    cfg = apply_overrides(preset("tiny"), ["train.max_steps=5", "train.max_seconds=600", "train.resume_every_s=0",
                                           "train.log_every=1", "train.swa_every=0"]).train
    with pytest.raises(train_stage.TrainingInterrupted, match="at step 5"):
        ds = Dataset.open(tok)
        train_stage.train(cfg, ds.shard_paths("train"), ds.vocab_size, tmp_path / "out", tmp_path / "work")
    assert torch.load(tmp_path / "work" / "resume.pt", weights_only=False)["step"] == 5
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the stage's handlers are gone again


def test_checkpoints_stay_in_work_until_the_artifact_is_committed(tmp_path):
    """The outputs get the SWA checkpoints as links: a failure before the commit leaves work/ whole."""
    from stages.train import link_tree
    src = tmp_path / "work" / "checkpoints"
    src.mkdir(parents=True)
    for step in (50, 100):
        (src / f"step_{step:06d}.pt").write_bytes(bytes([step]) * 10)
    link_tree(src, tmp_path / "out" / "checkpoints")
    assert sorted(p.name for p in src.iterdir()) == ["step_000050.pt", "step_000100.pt"]
    assert (tmp_path / "out" / "checkpoints" / "step_000100.pt").read_bytes() == bytes([100]) * 10
    assert os.path.samefile(src / "step_000100.pt", tmp_path / "out" / "checkpoints" / "step_000100.pt")  # no copy
