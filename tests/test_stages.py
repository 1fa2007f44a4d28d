"""Stage behaviour on real data: tokenize's byte-exact shard, training's cap and outputs, quantization."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from artifacts import run_stage
from stages import tokenize
from gpt.quant import BlobError, decode_weights
from tests.conftest import DATA


def test_val_shard_is_byte_identical_to_the_official_export(store):
    """The 902 documents with the official sp1024 model reproduce fineweb_val_000000.bin exactly."""
    docs = list(tokenize.iter_documents([tokenize.EMBEDDED_DOCS]))
    assert len(docs) == 902
    # the stage needs at least one training document: 901 go to val, the last one to train, and the
    # two shards laid end to end must be the official shard's tokens
    cfg = tokenize.TokenizeConfig(val_docs=901)
    art = run_stage(tokenize.STAGE, cfg, {}, store).artifact
    ds = tokenize.Dataset.open(art)
    val = np.fromfile(ds.shard_paths("val")[0], dtype="<u2", offset=1024)
    train = np.fromfile(ds.shard_paths("train")[0], dtype="<u2", offset=1024)
    official = (DATA / "fineweb_val_000000.bin").read_bytes()
    ours = np.concatenate([val, train])
    header = np.frombuffer(official[:1024], dtype="<i4")
    assert header[2] == len(ours)
    assert official[1024:] == ours.astype("<u2").tobytes()
    # and the header format is the challenge's
    vh = np.fromfile(ds.shard_paths("val")[0], dtype="<i4", count=256)
    assert vh[0] == 20240520 and vh[1] == 1 and vh[2] == len(val) and not vh[3:].any()


def test_training_honours_the_wallclock_cap_and_leaves_what_averaging_needs(pipeline_run):
    store, cfg, results = pipeline_run
    art = results["train"].artifact
    m = art.metrics
    assert m["steps"] == 8 and m["stop_reason"] == "max_steps"
    assert math.isfinite(m["final_train_loss"]) and m["final_train_loss"] < 7.0  # ln(1024) = 6.93 at init
    names = art.manifest["files"]
    assert {"final.pt", "ema.pt", "metrics.jsonl", "loss_curve.png", "train.json"} <= set(names)
    assert len(art.files("checkpoints/")) >= 2
    lines = art.file("metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"loss", "lr_mult", "tokens_per_s", "step_ms"} <= set(json.loads(lines[0]))
    # model FLOP/s by golf's count over the timed steps; the GPU memory peak only on CUDA
    assert m["tflops_per_s"] > 0 and m["peak_memory_mib"] is None


def test_wallclock_cap_stops_training(store, fast_cfg, caplog):
    from golf.config import apply_overrides
    from golf.pipeline import run_pipeline
    cfg = apply_overrides(fast_cfg, ["train.max_steps=0", "train.max_seconds=3"])
    with caplog.at_level("INFO", logger="golf.train"):
        res = {r.artifact.stage: r for r in run_pipeline(cfg, store, until="train")}
    # stderr is no terminal here: the progress goes to the log instead of a silent tqdm bar
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert progress and "/3 s" in progress[-1] and "step " in progress[-1]
    art = res["train"].artifact
    assert art.metrics["stop_reason"] == "max_seconds"
    elapsed = [json.loads(line)["elapsed_s"] for line in art.file("metrics.jsonl").read_text().splitlines()]
    # it stops at the first step boundary past the cap: the last step ended after 3 s, the one before it did not
    assert elapsed[-1] >= 3.0 and (len(elapsed) == 1 or elapsed[-2] < 3.0)
    assert art.metrics["train_seconds"] >= 3.0


def test_nan_loss_stops_with_the_step(store, fast_cfg):
    from golf.config import apply_overrides
    from golf.pipeline import run_pipeline
    from gpt.training import TrainingDiverged
    cfg = apply_overrides(fast_cfg, ["train.embed_lr=1e30", "train.matrix_lr=1e30", "train.scalar_lr=1e30"])
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        run_pipeline(cfg, store, until="train")
    assert not any(k.startswith("train-") for k in store.keys())


def test_quantize_round_trip_and_size_accounting(pipeline_run):
    store, cfg, results = pipeline_run
    q = results["quantize"].artifact
    size = json.loads(q.file("size.json").read_text())
    assert size["weights_bytes"] == q.file("weights.bin").stat().st_size
    assert size["code_bytes"] == len(q.file("shipped_code.py").read_bytes())
    assert size["artifact_bytes"] == size["weights_bytes"] + size["code_bytes"]
    state, meta = decode_weights(q.file("weights.bin").read_bytes())
    assert meta["model_config"]["vocab_size"] == 1024 and "embed.weight" in state


def test_corrupt_blob_fails_clearly(pipeline_run):
    store, cfg, results = pipeline_run
    blob = bytearray(results["quantize"].artifact.file("weights.bin").read_bytes())
    with pytest.raises(BlobError, match="bad magic"):
        decode_weights(b"XXXXXX" + bytes(blob[6:]))
    with pytest.raises(BlobError, match="corrupt"):
        decode_weights(bytes(blob[: len(blob) // 2]))


def test_shipped_code_alone_reproduces_the_pipeline_val_bpb(pipeline_run, tmp_path):
    """The wrapped program that is counted as code bytes runs on its own and gives the same val_bpb."""
    import subprocess
    import sys
    store, cfg, results = pipeline_run
    q, ev, tok = (results[s].artifact for s in ("quantize", "eval", "tokenize"))
    ds = tokenize.Dataset.open(tok)
    for name in ("shipped_code.py", "weights.bin"):
        (tmp_path / name).write_bytes(q.file(name).read_bytes())
    proc = subprocess.run([sys.executable, "shipped_code.py", "--tokenizer", str(ds.tokenizer_path), "--val",
                           *map(str, ds.shard_paths("val")), "--seq-len", str(cfg.eval.seq_len),
                           "--max-tokens", str(cfg.eval.max_tokens)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["val_bpb"] == pytest.approx(ev.metrics["val_bpb"], rel=1e-12)
    assert out["val_bytes"] == ev.metrics["val_bytes"]


def test_bad_documents_fail_clearly_and_leave_nothing(store, tmp_path):
    cases = {
        "notext.jsonl": (b'{"body": "x"}\n', "no string field 'text'"),
        "badutf8.jsonl": (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
        "empty.jsonl": (b"", "no documents"),
        "notjson.jsonl": (b"{text\n", "not valid JSON"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(tokenize.DataError, match=message):
            run_stage(tokenize.STAGE, tokenize.TokenizeConfig(source=str(p)), {}, store)
    assert store.keys() == [] and store.incomplete() == []


def test_a_fixed_averaging_method_reports_its_heldout_scores_as_a_diagnostic(pipeline_run):
    """With method=best the held-out scores choose the weights (training-data time the challenge counts); with
    a fixed method they are only shown, so they must not land in the training ledger."""
    from golf.config import apply_overrides
    from golf.pipeline import run_pipeline
    store, cfg, _ = pipeline_run  # tokenize and train come from the shared run's store
    cfg = apply_overrides(cfg, ["average.method=ema"])
    avg = {r.artifact.stage: r for r in run_pipeline(cfg, store, until="average")}["average"].artifact
    assert avg.metrics["chosen"] == "ema" and "heldout_loss_final" in avg.metrics
    assert "selection_seconds" not in avg.metrics and avg.metrics["heldout_diagnostic_seconds"] >= 0
