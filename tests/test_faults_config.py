"""Faults a user meets before anything useful runs: bad config values, cut or corrupt document files, the
CLI's help and import time, and the last progress line of a training run."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from golf.cli import main

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("golf: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


# --- 1. config validation ------------------------------------------------------------------------
BAD_VALUES = [
    ("train.max_seconds=0", "train.max_seconds"),        # with max_steps=0: no limit, trained forever
    ("train.max_seconds=-5", "train.max_seconds"),
    ("train.max_seconds=nan", "train.max_seconds"),
    ("train.seq_len=0", "train.seq_len"),                # ZeroDivisionError in the training loop
    ("train.batch_tokens=0", "train.batch_tokens"),
    ("train.batch_tokens=1000", "seq_len=256"),           # not whole sequences
    ("train.micro_batch_tokens=3000", "micro_batch_tokens"),
    ("train.nproc=3", "nproc=3"),                         # 8192 tokens do not split into 3 processes
    ("train.nproc=0", "train.nproc"),
    ("train.warmdown_frac=1.5", "train.warmdown_frac"),
    ("train.ema_decay=nan", "train.ema_decay"),
    ("train.matrix_lr=-0.1", "train.matrix_lr"),
    ("train.log_every=0", "train.log_every"),
    ("train.compile=maybe", "train.compile"),
    ("train.model.num_heads=0", "num_heads"),             # ZeroDivisionError in ModelConfig itself
    ("train.model.num_kv_heads=0", "num_kv_heads"),
    ("train.model.num_kv_heads=3", "num_kv_heads 3"),
    ("train.model.rope_dims=3", "rope_dims 3"),
    ("train.model.num_layers=0", "num_layers"),
    ("train.model.mlp_mult=nan", "mlp_mult"),
    ("eval.seq_len=0", "eval.seq_len"),                  # ZeroDivisionError in the eval loop
    ("eval.batch_seqs=0", "eval.batch_seqs"),
    ("eval.budget_seconds=-1", "eval.budget_seconds"),
    ("eval.ttt.lr=nan", "ttt.lr"),
    ("eval.ttt.method=lora", "doc_isolation=true"),       # was found only when the eval stage started
    ("eval.ttt.lora_layout=slots", "ttt.lora_layout"),
    ("average.swa_stride=0", "average.swa_stride"),
    ("average.method=mean", "average.method"),
    ("compliance.train_limit_s=nan", "compliance.train_limit_s"),
    ("compliance.cap_bytes=0", "compliance.cap_bytes"),
    ("tokenize.workers=0", "tokenize.workers"),
    ("tokenize.max_docs=30", "tokenize.max_docs"),       # fewer than the 60 val docs: no training documents
    ("tokenize.sp_vocab_size=70000", "tokenize.sp_vocab_size"),
    ("quantize.gptq_damp=inf", "quantize.gptq_damp"),
    ("quantize.seq_len=0", "quantize.seq_len"),
]


@pytest.mark.parametrize("setting, words", BAD_VALUES)
def test_bad_values_are_one_line_and_exit_2(tmp_path, capsys, setting, words):
    assert_one_line_error(*cli(capsys, "--store", str(tmp_path), "config", "--set", setting), setting, words)


@pytest.mark.parametrize("setting", ["train.seq_len=0", "train.batch_tokens=0", "eval.seq_len=0",
                                     "train.max_seconds=0", "train.max_seconds=nan"])
def test_run_refuses_them_before_running_anything(tmp_path, capsys, setting):
    code, err = cli(capsys, "--store", str(tmp_path / "store"), "run", "--no-prefect", "--set", setting)
    assert_one_line_error(code, err, setting)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))


def test_overrides_of_one_config_are_validated_together_in_any_order(capsys):
    for sets in (["train.max_seconds=0", "train.max_steps=10"], ["train.max_steps=10", "train.max_seconds=0"],
                 ["eval.ttt.method=lora", "eval.doc_isolation=true"],
                 ["train.model.num_heads=6", "train.model.model_dim=192", "train.model.num_kv_heads=3"]):
        argv = ["config"] + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 0, (sets, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "train.max_seconds = 0.0" in out and "train.model.model_dim = 192" in out


def test_presets_build_and_round_trip_through_config_from_dict(capsys):
    from golf.config import PRESETS, PipelineConfig, config_from_dict, preset
    for name in PRESETS:
        cfg = preset(name)
        assert config_from_dict(PipelineConfig, dataclasses.asdict(cfg)) == cfg
        assert main(["config", "--preset", name]) == 0
    capsys.readouterr()


def test_config_from_dict_refusals_are_config_errors_naming_the_field():
    """The Prefect flows and deployments build their configs with config_from_dict."""
    from golf.config import ConfigError, PipelineConfig, config_from_dict, preset
    from gpt.training import TrainConfig
    base = dataclasses.asdict(preset("tiny"))

    def with_(section: str, **changes) -> dict:
        d = json.loads(json.dumps(base))
        target = d
        for part in section.split("."):
            target = target[part]
        target.update(changes)
        return d

    cases = [
        (with_("train", seq_len=0), r"train\.seq_len must be an integer >= 1"),
        (with_("train", max_seconds=float("nan")), r"train\.max_seconds"),
        (with_("train.model", num_heads=3), r"^train\.model: model_dim 128 is not divisible by num_heads 3"),
        (with_("eval", seq_len=0), r"eval\.seq_len"),
        (with_("train", seq_len="1024"), r"^train\.seq_len: '1024' is not a valid int"),
        (with_("average", method="mean"), r"average\.method"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(PipelineConfig, data)
    with pytest.raises(ConfigError, match=r"^train: train\.batch_tokens must be"):
        config_from_dict(TrainConfig, {"batch_tokens": -1}, "train")
    assert config_from_dict(TrainConfig, {"max_seconds": 60}).max_seconds == 60.0  # an int where a float goes


def test_the_flows_refuse_a_bad_config_with_a_config_error(tmp_path):
    from flows.pipeline import pipeline_flow, stage_task
    from golf.config import ConfigError, preset
    bad = dataclasses.asdict(preset("tiny"))
    bad["eval"]["seq_len"] = 0
    with pytest.raises(ConfigError, match=r"eval\.seq_len must be an integer >= 1"):
        pipeline_flow.fn(config=bad, store_root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^train: train\.seq_len must be an integer >= 1"):
        stage_task.fn("train", {**bad["train"], "seq_len": 0}, {}, str(tmp_path))


# --- 2. cut or corrupt document files ------------------------------------------------------------------
def _docs(n: int = 145) -> bytes:
    rng = random.Random(0)  # random words: the file does not compress to a few bytes
    return b"".join(json.dumps({"text": " ".join(str(rng.random()) for _ in range(40))}).encode() + b"\n"
                    for _ in range(n))


@pytest.fixture
def zst_files(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(_docs())
    flipped = bytearray(data)
    mid = len(data) // 2
    flipped[mid:mid + 8] = bytes(b ^ 0xFF for b in flipped[mid:mid + 8])
    files = {"whole": data, "two_frames": data + data, "cut": data[:len(data) * 2 // 3], "flipped": bytes(flipped),
             "empty": b""}
    out = {}
    for name, raw in files.items():
        out[name] = tmp_path / f"{name}.jsonl.zst"
        out[name].write_bytes(raw)
    return out


@pytest.fixture(params=["zstandard", "zstd-cli"])
def zstd_reader(request, monkeypatch):
    if request.param == "zstd-cli":
        if shutil.which("zstd") is None:
            pytest.skip("no zstd command")
        monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError: the CLI reads
    return request.param


def test_cut_or_corrupt_zstd_files_are_data_errors_naming_them(zst_files, zstd_reader):
    from tokenizing.docs import DataError, iter_documents
    assert sum(1 for _ in iter_documents([zst_files["whole"]])) == 145
    assert sum(1 for _ in iter_documents([zst_files["two_frames"]])) == 290
    for name in ("cut", "flipped", "empty"):
        with pytest.raises(DataError, match=rf"{name}\.jsonl\.zst"):
            sum(1 for _ in iter_documents([zst_files[name]]))


def test_golf_run_stops_on_a_cut_zstd_file(zst_files, tmp_path, capsys):
    code, err = cli(capsys, "--store", str(tmp_path / "store"), "run", "--no-prefect", "--until", "tokenize",
                    "--set", f"tokenize.source={zst_files['cut']}", "--set", "tokenize.val_docs=10")
    # the stage's log lines come first: the error is the last line (was: exit 0 with the documents before the cut)
    assert_one_line_error(code, err.splitlines()[-1], "cut.jsonl.zst", "truncated")


def test_cut_or_corrupt_parquet_files_are_data_errors_naming_them(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from tokenizing.docs import DataError, iter_documents
    texts = [json.loads(line)["text"] for line in _docs().splitlines()]
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": texts}), whole, row_group_size=40)
    data = whole.read_bytes()
    assert sum(1 for _ in iter_documents([whole])) == 145
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])
    flipped = bytearray(data)
    at = len(data) // 3  # inside a row group's (snappy-compressed) page
    flipped[at:at + 16] = bytes(b ^ 0xFF for b in flipped[at:at + 16])
    (tmp_path / "flipped.parquet").write_bytes(bytes(flipped))
    for name in ("cut", "flipped"):
        with pytest.raises(DataError, match=rf"{name}\.parquet"):
            sum(1 for _ in iter_documents([tmp_path / f"{name}.parquet"]))


# --- 3 and 4. the CLI's help and import time -------------------------------------------------------------
def test_help_lists_every_preset(capsys):
    from golf.config import DEFAULT_PRESET, PRESETS
    from golf.defaults import PRESET_NAMES
    assert PRESET_NAMES == tuple(PRESETS) and DEFAULT_PRESET in PRESETS
    for command in ("run", "config", "deploy"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert ", ".join(PRESETS) in " ".join(capsys.readouterr().out.split()), command


def test_deployment_defaults_are_the_ones_the_parser_shows():
    from golf import defaults, deployments
    assert deployments.PREFECT_FILE == defaults.PREFECT_FILE == ROOT / "prefect.yaml"
    assert deployments.DEFAULT_POOL == defaults.DEFAULT_POOL


def test_the_parser_imports_no_torch_prefect_or_numpy():
    code = ("import sys, golf.cli; golf.cli.build_parser(); "
            "print('torch' in sys.modules, 'prefect' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_user_errors_keep_exit_2_without_the_heavy_modules(tmp_path):
    """`golf artifacts show` of a missing key: a StoreError, exit 2, and torch never imported."""
    code = ("import sys, golf.cli; rc = golf.cli.main(['--store', sys.argv[1], 'artifacts', 'show', 'train-nope']); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert r.stderr.strip().startswith("golf: error: no artifact 'train-nope'")


def test_user_error_classes_are_those_of_the_loaded_modules():
    import gpt.shards
    import tokenizing.docs
    from artifacts import StoreError
    from golf.cli import user_errors
    from golf.config import ConfigError
    from golf.deployments import DeployError
    from golf.submit import SubmitError
    assert set(user_errors()) == {ConfigError, StoreError, tokenizing.docs.DataError, gpt.shards.ShardError,
                                  SubmitError, DeployError, FileNotFoundError}


# --- 5. the last progress line of training --------------------------------------------------------------
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("sets, why", [
    (["train.max_steps=3"], "step limit (max_steps=3)"),
    (["train.max_steps=0", "train.max_seconds=1"], "time limit (max_seconds=1)"),
])
def test_training_progress_ends_with_where_it_stopped(store, tmp_path, monkeypatch, sets, why):
    from artifacts import run_stage
    from golf.config import apply_overrides, preset
    from gpt import training as train_stage
    from stages import tokenize
    from tokenizing.dataset import Dataset
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # a log file, not a terminal
    tok = run_stage(tokenize.STAGE, tokenize.TokenizeConfig(), {}, store).artifact
    cfg = apply_overrides(preset("tiny"), ["train.max_seconds=600", "train.log_every=1000", "train.swa_every=0",
                                           "train.resume_every_s=0", "train.seq_len=64", "train.batch_tokens=512",
                                           "train.micro_batch_tokens=512", "train.model.num_layers=2", *sets]).train
    (tmp_path / "out").mkdir()
    lines = _Lines()
    log, level = logging.getLogger("golf.train"), logging.getLogger("golf.train").level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        ds = Dataset.open(tok)
        result = train_stage.train(cfg, ds.shard_paths("train"), ds.vocab_size, tmp_path / "out", tmp_path / "work")
    finally:
        log.removeHandler(lines)
        log.setLevel(level)
    progress = [line for line in lines.lines if line.startswith("train: ")]
    assert progress, lines.lines
    steps = result["steps"]
    assert f"stopped at step {steps}, " in progress[-1] and progress[-1].endswith(why), progress[-1]
    if "time" in why:
        assert progress[-1].startswith("train: 1/1 s (100%)"), progress[-1]
