"""Compliance checks (each with a case that passes and one that must fail), the Welch test, and golf submit."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from artifacts import Artifact, run_stage
from golf.cli import main
from golf.stats import betainc, student_t_sf, welch_one_sided
from stages import compliance as C
from gpt.calibration import CalibrationRecord


# --- size -------------------------------------------------------------------------------------------------
def test_size_passes_under_the_cap_and_fails_over_it():
    ok = C.check_size(15_900_000, 40_000, 16_000_000, {"weights_bytes": 15_900_000, "code_bytes": 40_000,
                                                       "artifact_bytes": 15_940_000})
    assert ok["status"] == "PASS" and "margin 60,000" in ok["evidence"] and "size.json agrees" in ok["evidence"]
    over = C.check_size(15_990_000, 10_001, 16_000_000)
    assert over["status"] == "FAIL" and "OVER by 1" in over["evidence"]
    # code bytes logged by the stage but not the bytes of the file that ships (the PR #1835 dispute)
    wrong = C.check_size(15_000_000, 40_000, 16_000_000, {"weights_bytes": 15_000_000, "code_bytes": 12_000,
                                                          "artifact_bytes": 15_012_000})
    assert wrong["status"] == "FAIL" and "not the files' bytes" in wrong["evidence"]


# --- time ledger ------------------------------------------------------------------------------------------
def test_time_ledger_counts_calibration_and_flags_other_hardware():
    hw, on_target = C.hardware({"gpu_count": 8, "gpu_name": "NVIDIA H100 80GB HBM3"}, 8)
    assert on_target and hw == "8x NVIDIA H100 80GB HBM3, 8 processes"
    assert not C.hardware({"gpu_count": 8, "gpu_name": "NVIDIA H100 PCIe"}, 8)[1]
    assert not C.hardware({"gpu_count": 1, "gpu_name": "NVIDIA H100 80GB HBM3"}, 1)[1]
    assert not C.hardware({"gpu_count": 0, "cpu_count": 16}, 1)[1]

    ok = C.check_time("train_time", {"training loop": 588.0, "GPTQ calibration": 4.7}, 600, hw, True,
                      {"compile warm-up": 30.0})
    assert ok["status"] == "PASS" and ok["warning"] is None and "592.7 s" in ok["evidence"]
    # the Hessians pushed the run past 600 s: the 04-29 rerun had to reserve time for them
    over = C.check_time("train_time", {"training loop": 596.0, "GPTQ calibration": 4.7}, 600, hw, True)
    assert over["status"] == "FAIL" and "600.7 s" in over["evidence"]
    elsewhere = C.check_time("eval_time", {"scoring": 100.0}, 600, "1x NVIDIA H100 PCIe, 1 process", False)
    assert elsewhere["status"] == "PASS" and "not a compliant timing" in elsewhere["warning"]


def _art(stage, metrics=None, config=None, duration=0.0, inputs=None, key=None):
    return Artifact(path=None, manifest={"key": key or f"{stage}-x", "stage": stage, "metrics": metrics or {},
                                         "config": config or {}, "duration_s": duration, "inputs": inputs or {}})


def test_ledgers_read_optional_fields_from_other_stages():
    tr = _art("train", {"train_seconds": 590.0, "warmup_seconds": 20.0})
    avg = _art("average", {"heldout_loss_final": 3.0, "heldout_loss_ema": 3.1}, {"method": "best"}, duration=7.0)
    calib = CalibrationRecord("train", ("fineweb_train_000000.bin",), 1000, 4.0)
    counted, excluded = C.train_ledger(tr, avg, calib)
    assert counted == {"training loop": 590.0, "GPTQ calibration": 4.0,
                       "average stage (bounds held-out selection)": 7.0}
    assert excluded == {"compile warm-up": 20.0}
    avg2 = _art("average", {"selection_seconds": 0.5, "heldout_loss_final": 3.0}, {"method": "best"}, duration=7.0)
    assert C.train_ledger(tr, avg2, None)[0] == {"training loop": 590.0, "held-out selection": 0.5}
    avg3 = _art("average", {"heldout_diagnostic_seconds": 80.0, "heldout_loss_ema": 3.0}, {"method": "ema"})
    assert C.train_ledger(tr, avg3, None) == ({"training loop": 590.0},
                                                         {"compile warm-up": 20.0, "held-out diagnostic": 80.0})
    ev = _art("eval", {"eval_seconds": 400.0, "load_seconds": 20.0, "ttt_seconds": 150.0, "pre_quant_eval_seconds": 9})
    assert sum(C.eval_ledger(ev)[0].values()) == 570.0


# --- data ---------------------------------------------------------------------------------------------------
def test_val_documents_in_training_data_fail():
    val = np.array([11, 22, 33], dtype="<u8")
    assert C.check_val_not_in_train(val, np.array([44, 55], dtype="<u8"))["status"] == "PASS"
    leaked = C.check_val_not_in_train(val, np.array([44, 22, 55], dtype="<u8"))
    assert leaked["status"] == "FAIL" and "1 shared" in leaked["evidence"]


def test_calibration_must_not_read_val_shards():
    val = ["fineweb_val_000000.bin"]
    assert C.check_calibration(None, val, False)["status"] == "PASS"
    train = CalibrationRecord("train", ("fineweb_train_000000.bin",), 2_000_000, 4.7)
    assert C.check_calibration(train, val, True)["status"] == "PASS"
    bad = C.check_calibration(CalibrationRecord("train", ("/data/fineweb_val_000000.bin",), 10, 4.7), val, True)
    assert bad["status"] == "FAIL" and "fineweb_val_000000.bin" in bad["evidence"]
    assert C.check_calibration(CalibrationRecord("val", (), 10, 4.7), val, True)["status"] == "FAIL"
    assert C.check_calibration(None, val, True)["status"] == "FAIL"  # calibrated, source unrecorded


def test_gptq_and_lqer_quantize_pass_compliance_through_one_calibration_record(pipeline_run):
    """The contract in one place: quantize writes calibration.json, compliance reads it (issue: every GPTQ run
    FAILed with 'wrote no calibration.json')."""
    from golf.config import apply_overrides
    from golf.pipeline import run_pipeline
    from gpt.calibration import read_calibration
    store, cfg, _ = pipeline_run
    for extra in (["quantize.method=gptq"], ["quantize.lqer_rank=2", "quantize.lqer_top=1"]):
        res = {r.artifact.stage: r.artifact for r in run_pipeline(apply_overrides(cfg, extra), store)}
        record = read_calibration(res["quantize"])
        assert record is not None and record.source == "train" and record.tokens > 0
        assert record.shards == ("fineweb_train_000000.bin",)
        report = json.loads(res["compliance"].file("report.json").read_text())
        checks = {c["check"]: c for c in report["checks"]}
        assert checks["calibration"]["status"] == "PASS", checks["calibration"]
        assert f"GPTQ calibration {record.seconds:.1f} s" in checks["train_time"]["evidence"]
        assert res["quantize"].metrics["calibration_seconds"] == record.seconds


def test_val_split_must_be_the_canonical_one():
    sha = "a" * 64
    known = {sha: {"name": "test tokenizer", "val_docs": 50_000, "val_tokens": 1_000_000}}
    sample = C.check_val_split(True, 60, 69_836, 8_191, sha, known)
    assert sample["status"] == "SKIP" and "not comparable" in sample["warning"]
    ok = C.check_val_split(False, 50_000, 1_000_000, 999_999, sha, known)
    assert ok["status"] == "PASS" and "checked against 1,000,000" in ok["evidence"]
    short = C.check_val_split(False, 10_000, 1_000_000, 999_999, sha, known)  # the Issue #2127 pitfall
    assert short["status"] == "FAIL" and "leak into training" in short["evidence"]
    assert C.check_val_split(False, 50_000, 1_000_123, 1_000_122, sha, known)["status"] == "FAIL"
    partial = C.check_val_split(False, 50_000, 1_000_000, 8_191, sha, known)
    assert partial["status"] == "FAIL" and "max_tokens" in partial["evidence"]
    unknown = C.check_val_split(False, 50_000, 123, 122, "b" * 64, known)
    assert unknown["status"] == "PASS" and "not checked" in unknown["evidence"]
    assert C.check_val_split(False, 50_000, 123, 122, "b" * 64, known, expected_tokens=124)["status"] == "FAIL"


# --- test-time training order ---------------------------------------------------------------------------------
def _events(*spec):
    return [{"event": e, "start": s, "end": t} for e, s, t in spec]


def test_ttt_log_score_first_passes_and_adapt_before_score_fails():
    assert C.check_ttt_order(None, 100)["status"] == "SKIP"
    assert C.check_ttt_order(None, 100, ttt_claimed=True)["status"] == "FAIL"
    score_first = _events(("score", 0, 40), ("adapt", 0, 40), ("score", 40, 80), ("adapt", 20, 80), ("score", 80, 100))
    ok = C.check_ttt_order(score_first, 100)
    assert ok["status"] == "PASS" and "3 score and 2 adapt" in ok["evidence"]
    early = C.check_ttt_order(_events(("score", 0, 40), ("adapt", 0, 50), ("score", 40, 100)), 100)
    assert early["status"] == "FAIL" and "target 40 was not scored before" in early["evidence"]
    rescored = C.check_ttt_order(_events(("score", 0, 40), ("adapt", 0, 40), ("score", 30, 100)), 100)
    assert rescored["status"] == "FAIL" and "scored a second time" in rescored["evidence"]
    gap = C.check_ttt_order(_events(("score", 0, 40), ("score", 50, 100)), 100)
    assert gap["status"] == "FAIL" and "cover 90" in gap["evidence"]


def test_ttt_log_is_read_line_by_line(tmp_path):
    p = tmp_path / "ttt_log.jsonl"
    p.write_text('{"event": "score", "start": 0, "end": 8}\n\n{"event": "adapt", "start": 0, "end": 8}\n')
    assert [e["event"] for e in C.read_ttt_log(p)] == ["score", "adapt"]
    p.write_text('{"event": "score", "start": 0, "end": 8}\n{"event": "train", "start": 0, "end": 8}\n')
    with pytest.raises(C.ComplianceInputError, match="ttt_log.jsonl:2"):
        C.read_ttt_log(p)


# --- bits per byte ----------------------------------------------------------------------------------------------
def test_bpb_recomputed_from_decoded_text_and_a_byte_off_fails(pipeline_run):
    import sentencepiece as spm
    from gpt.bpb import bits_per_byte
    from gpt.shards import load_split
    from tokenizing.dataset import Dataset
    _, _, results = pipeline_run
    ev, tok = results["eval"].artifact, results["tokenize"].artifact
    ds = Dataset.open(tok)
    nll = np.load(ev.file("token_nll.npy"))
    tokens = load_split(ds.shard_paths("val"))[:len(nll) + 1]
    sp = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    n_bytes, rt_ok, rt_n = C.decoded_bytes(sp, tokens, ds.info["bos_id"], np.load(tok.file("doc_hashes_val.npy")))
    assert n_bytes == ev.metrics["val_bytes"]  # decoding agrees with the piece table, independently
    assert rt_n >= 2 and rt_ok == rt_n
    ok = C.check_bpb(float(nll.sum()), len(nll), n_bytes, ev.metrics["val_bpb"], ev.metrics["val_bytes"], 1e-12)
    assert ok["status"] == "PASS"
    # an accounting that counts one byte too many (e.g. a space after BOS) reports a lower val_bpb
    off = C.check_bpb(float(nll.sum()), len(nll), n_bytes, bits_per_byte(float(nll.sum()), n_bytes + 1),
                      n_bytes + 1, 1e-12)
    assert off["status"] == "FAIL" and f"over {n_bytes + 1:,} bytes" in off["evidence"]
    sidecar_off = C.check_bpb(float(nll.sum()), len(nll), n_bytes, ev.metrics["val_bpb"], n_bytes, 1e-12,
                              sidecar_bytes=n_bytes - 1)
    assert sidecar_off["status"] == "FAIL"


# --- boundary leak ----------------------------------------------------------------------------------------------
class ToyDocModel(torch.nn.Module):
    """Predicts from the mean embedding of its own document's tokens so far (isolated by construction).
    ``smear`` plants the SmearGate bug: every position also mixes in the previous token's embedding,
    across BOS too, so the first prediction of a document sees the last token of the one before."""

    def __init__(self, vocab: int, bos: int, smear: float):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.out = torch.nn.Linear(16, vocab)
        self.bos, self.smear = bos, smear

    def token_nll(self, x, y, attn_mask=None):
        B, T = x.shape
        doc = torch.cumsum(x == self.bos, dim=1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (doc[:, :, None] == doc[:, None, :]) & causal
        e = self.emb(x)
        h = same.float() @ e / same.sum(-1, keepdim=True)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        logits = self.out(h + self.smear * prev).double()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(B, T)


def _toy_stream(n_docs=6, vocab=64, bos=1, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[bos], rng.integers(4, vocab, size=rng.integers(20, 60))]) for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint16), np.arange(4, vocab)


def test_boundary_leak_planted_in_a_toy_model_fails_when_isolation_is_claimed(monkeypatch):
    tokens, ids = _toy_stream()
    clean = C.boundary_shift(ToyDocModel(64, 1, 0.0), tokens, 1, ids, 128, 0, 3, 0, doc_isolation=True)
    assert clean["pairs"] == 3 and clean["max_shift"] == 0.0
    assert C.check_boundary(clean, True, 1e-6)["status"] == "PASS"
    # eval's own isolation cuts the stream at BOS: even the leaky model cannot see the previous document
    cut = C.boundary_shift(ToyDocModel(64, 1, 0.5), tokens, 1, ids, 128, 0, 3, 0, doc_isolation=True)
    assert cut["max_shift"] == 0.0
    # an eval whose isolation is only the model's attention mask (windows cross BOS) leaks through the smear
    real = C.score_stream
    monkeypatch.setattr(C, "score_stream", lambda *a, doc_isolation=False, **k: real(*a, **k))
    leaky = C.boundary_shift(ToyDocModel(64, 1, 0.5), tokens, 1, ids, 128, 0, 3, 0, doc_isolation=True)
    assert leaky["first_token_shift"] > 1e-3 and leaky["max_shift"] == leaky["first_token_shift"]
    fail = C.check_boundary(leaky, True, 1e-6)
    assert fail["status"] == "FAIL" and "crosses the document boundary" in fail["evidence"]
    assert C.check_boundary(None, True, 1e-6)["status"] == "SKIP"


def test_boundary_leak_of_the_real_model_is_reported_and_fails_a_false_isolation_claim(pipeline_run):
    import sentencepiece as spm
    from gpt.bpb import piece_tables
    from gpt.shards import load_split
    from gpt.shipped_eval import load_model
    from tokenizing.dataset import Dataset
    _, cfg, results = pipeline_run
    ds = Dataset.open(results["tokenize"].artifact)
    model = load_model(results["quantize"].artifact.file("weights.bin").read_bytes())
    _, _, boundary = piece_tables(spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path)))
    shift = C.boundary_shift(model, load_split(ds.shard_paths("val")), ds.info["bos_id"], np.flatnonzero(~boundary),
                             cfg.eval.seq_len, cfg.eval.stride, 2, 0, doc_isolation=False)
    assert shift["max_shift"] > 1e-3  # the baseline model attends across BOS within a window
    allowed = C.check_boundary(shift, False, 1e-6)
    assert allowed["status"] == "PASS" and allowed["evidence"].startswith("documents not isolated")
    assert C.check_boundary(shift, True, 1e-6)["status"] == "FAIL"


# --- the stage --------------------------------------------------------------------------------------------------
def test_stage_reports_every_check_and_fails_over_a_lowered_cap(pipeline_run, store):
    _, cfg, results = pipeline_run
    comp = results["compliance"].artifact
    report = json.loads(comp.file("report.json").read_text())
    names = [c["check"] for c in report["checks"]]
    assert names == ["size", "train_time", "eval_time", "val_not_in_train", "calibration", "val_split", "ttt_order",
                     "bpb_recomputed", "boundary_leak"]
    assert report["verdict"] == "PASS" and comp.metrics["bpb_recomputed_status"] == "PASS"
    assert any("not a compliant timing" in w for w in report["warnings"])
    assert "| size | PASS |" in comp.file("report.md").read_text()
    inputs = {r: results[r].artifact for r in C.STAGE.inputs}
    size = results["quantize"].artifact.metrics["artifact_bytes"]
    tight = run_stage(C.STAGE, C.ComplianceConfig(cap_bytes=size - 1), inputs, store).artifact
    assert tight.metrics["verdict"] == "FAIL" and tight.metrics["failed"] == ["size"]
    assert "OVER by 1" in tight.file("report.md").read_text()


# --- statistics ---------------------------------------------------------------------------------------------------
def _t_sf_by_quadrature(t: float, df: float, n: int = 200_000) -> float:
    """P(T > t) by Simpson's rule on the density over [t, t + 400] (an independent route)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    x = np.linspace(t, t + 400.0, n + 1)
    f = c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = 400.0 / n
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def test_student_t_tail_against_known_values_and_quadrature():
    assert student_t_sf(2.0, 10) == pytest.approx(0.036694, abs=5e-7)
    assert student_t_sf(1.812461, 10) == pytest.approx(0.05, abs=1e-6)     # t table, 95% one-sided, df 10
    assert student_t_sf(3.169273, 10) == pytest.approx(0.005, abs=1e-6)    # t table, 99.5%, df 10
    assert student_t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)          # Cauchy
    assert student_t_sf(2.0, 2) == pytest.approx(0.5 - 1 / math.sqrt(6), abs=1e-12)  # closed form for df 2
    assert student_t_sf(-2.0, 10) == pytest.approx(1 - 0.036694, abs=5e-7)
    assert student_t_sf(0.0, 7.3) == pytest.approx(0.5, abs=1e-15)
    for t, df in [(0.7, 3.4), (2.5, 4.1), (4.0, 6.0), (1.3, 25.7)]:
        assert student_t_sf(t, df) == pytest.approx(_t_sf_by_quadrature(t, df), rel=1e-5)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # sum_{j=2..4} C(4,j) x^j (1-x)^(4-j)


def test_welch_one_sided():
    # equal sizes and variances: Welch's df is 2n - 2 and t is Student's pooled t
    r = welch_one_sided([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0])
    assert r.improvement == 2.0 and r.df == pytest.approx(6.0) and r.t == pytest.approx(2.0 / math.sqrt(5 / 6))
    assert r.p_value == pytest.approx(student_t_sf(r.t, 6.0))
    # a margin larger than the gain makes the claim fail
    assert welch_one_sided([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0], margin=3.0).p_value > 0.5
    with pytest.raises(ValueError, match="at least 2 runs"):
        welch_one_sided([1.0], [2.0, 3.0])


# --- compare and submit --------------------------------------------------------------------------------------------
def _fake_run(store, seed: int, loss: float, tokens: int = 1000, n_bytes: int = 2500, lr: float = 0.04) -> str:
    """A chain of minimal artifacts (manifests only) standing for one pipeline run; returns the eval key."""
    keys = {}
    specs = [("tokenize", {}, {"source": "x"}), ("train", {"tokenize": "tokenize"}, {"seed": seed, "matrix_lr": lr}),
             ("average", {"train": "train"}, {"method": "final"}), ("quantize", {"average": "average"}, {"bits": 6})]
    for stage, inputs, config in specs:
        key = f"{stage}-s{seed}l{lr}"
        keys[stage] = key
        store.commit(store.begin(key), {"stage": stage, "config": config, "metrics": {},
                                        "inputs": {r: keys[s] for r, s in inputs.items()}})
    key = f"eval-s{seed}l{lr}t{tokens}"
    bpb = loss * tokens / n_bytes / math.log(2)
    store.commit(store.begin(key), {"stage": "eval", "config": {}, "inputs": {r: keys[r] for r in
                                                                              ("quantize", "average", "tokenize")},
                                    "metrics": {"val_loss": loss, "val_bpb": bpb, "val_tokens": tokens,
                                                "val_bytes": n_bytes}})
    return key


def test_compare_prints_the_welch_verdict(store, capsys):
    a = [_fake_run(store, s, loss) for s, loss in [(1, 2.000), (2, 2.002), (3, 1.998)]]
    b = [_fake_run(store, s, loss, lr=0.05) for s, loss in [(1, 2.030), (2, 2.031), (3, 2.029)]]
    assert main(["--store", str(store.root), "compare", "--a", ",".join(a), "--b", ",".join(b)]) == 0
    out = capsys.readouterr().out
    assert "improvement   b - a = 0.030000 nats/token" in out and "verdict       SIGNIFICANT" in out
    assert "one-sided on val_loss" in out
    # a gain below the threshold is not significant
    c = [_fake_run(store, s, loss, lr=0.06) for s, loss in [(1, 2.003), (2, 2.005), (3, 2.001)]]
    assert main(["--store", str(store.root), "compare", "--a", ",".join(c), "--b", ",".join(a)]) == 0
    assert "NOT significant" in capsys.readouterr().out
    # different tokenizations: the test runs on val_bpb with the threshold converted
    d = [_fake_run(store, s, loss, tokens=800, lr=0.07) for s, loss in [(1, 2.40), (2, 2.41), (3, 2.39)]]
    assert main(["--store", str(store.root), "compare", "--a", ",".join(d), "--b", ",".join(a)]) == 0
    assert "val_bpb (tokenizations differ)" in capsys.readouterr().out
    assert main(["--store", str(store.root), "compare", "--a", a[0], "--b", b[0]]) == 2  # one run per side
    assert "at least 2 runs" in capsys.readouterr().err


def test_submit_refuses_runs_that_are_not_seeds_of_one_config(store):
    from golf.submit import config_differences, resolve_run
    runs = [resolve_run(store, _fake_run(store, s, 2.0)) for s in (1, 2)]
    assert config_differences(runs) == []
    runs.append(resolve_run(store, _fake_run(store, 3, 2.0, lr=0.05)))
    diffs = config_differences(runs)
    assert len(diffs) == 1 and diffs[0].startswith("train.matrix_lr: 0.04")


def test_submit_writes_a_records_folder_whose_train_gpt_reproduces_val_bpb(pipeline_run, tmp_path, capsys):
    from golf.submit import eval_command, resolve_run
    from tokenizing.dataset import Dataset
    store, _, results = pipeline_run
    comp, q, ev = (results[s].artifact for s in ("compliance", "quantize", "eval"))
    out = tmp_path / "record"
    assert main(["--store", str(store.root), "submit", comp.key, "--out", str(out), "--name", "Tiny",
                 "--github-id", "someone"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "submission.json", "train_gpt.py", "weights.bin", "train_seed1337.log",
            "train_seed1337_metrics.jsonl", "eval_seed1337.log", "compliance_seed1337.md"} <= names
    code = (out / "train_gpt.py").read_bytes()
    assert code == q.file("shipped_code.py").read_bytes() and len(code) == q.metrics["code_bytes"]
    sub = json.loads((out / "submission.json").read_text())
    assert sub["github_id"] == "someone" and sub["val_bpb"] == ev.metrics["val_bpb"]
    assert sub["bytes_total"] == q.metrics["artifact_bytes"] and sub["bytes_code"] == len(code)
    assert [s["seed"] for s in sub["seed_results"]] == [1337]
    readme = (out / "README.md").read_text()
    assert "torchrun --standalone" in readme and f"{ev.metrics['val_bpb']:.8f}" in readme
    assert "requirements.txt" in names and (out / "requirements.txt").read_text().strip()

    # the README's command, run from the folder alone, gives the pipeline's val_bpb
    ds = Dataset.open(results["tokenize"].artifact)
    argv = eval_command(resolve_run(store, comp.key), str(ds.tokenizer_path), [str(p) for p in ds.shard_paths("val")])
    proc = subprocess.run([sys.executable, *argv], cwd=out, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["val_bpb"] == pytest.approx(ev.metrics["val_bpb"], rel=1e-12)
    assert got["val_bytes"] == ev.metrics["val_bytes"]

    # a non-empty folder is refused; an eval key is refused (the verdict must ship with the record)
    capsys.readouterr()
    assert main(["--store", str(store.root), "submit", comp.key, "--out", str(out), "--name", "x",
                 "--github-id", "y"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["--store", str(store.root), "submit", ev.key, "--out", str(tmp_path / "r2"), "--name", "x",
                 "--github-id", "y"]) == 2
    assert "needs compliance keys" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not list(tmp_path.glob(".r2.tmp-*"))


def test_submit_packages_several_seeds_and_refuses_a_failed_run(pipeline_run, tmp_path, capsys):
    """A second seed made by copying the run's artifacts under new keys with another train seed."""
    from artifacts import ArtifactStore
    store, _, results = pipeline_run
    copy = ArtifactStore(tmp_path / "store")
    chain = ["tokenize", "train", "average", "quantize", "eval", "compliance"]
    keys = {}
    for seed, delta in ((1337, 0.0), (42, 0.01)):
        for stage in chain:
            art = results[stage].artifact
            key = art.key if seed == 1337 or stage == "tokenize" else f"{art.key}-s{seed}"
            keys[(seed, stage)] = key
            if copy.exists(key):
                continue
            shutil.copytree(art.path, copy.path_of(key))
            m = json.loads((copy.path_of(key) / "manifest.json").read_text())
            m["key"] = key
            m["inputs"] = {r: keys[(seed, r)] for r in m.get("inputs", {})}
            if stage == "train":
                m["config"]["seed"] = seed
            if stage == "eval":
                m["metrics"]["val_loss"] += delta
                m["metrics"]["val_bpb"] += delta
            (copy.path_of(key) / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "record"
    comp = [keys[(s, "compliance")] for s in (1337, 42)]
    assert main(["--store", str(copy.root), "submit", *comp, "--out", str(out), "--name", "Two seeds",
                 "--github-id", "someone"]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["seeds"] == [1337, 42]
    bpb = results["eval"].artifact.metrics["val_bpb"]
    assert sub["val_bpb"] == pytest.approx(bpb + 0.005) and sub["val_bpb_std"] == pytest.approx(0.01 / math.sqrt(2))
    readme = (out / "README.md").read_text()
    assert "| mean |" in readme and (out / "train_seed42.log").exists()

    # a run whose compliance failed is not packaged unless asked
    m = json.loads((copy.path_of(comp[1]) / "manifest.json").read_text())
    m["metrics"].update(verdict="FAIL", failed=["size"])
    (copy.path_of(comp[1]) / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["--store", str(copy.root), "submit", *comp, "--out", str(tmp_path / "r2"), "--name", "x",
                 "--github-id", "y"]) == 2
    assert "compliance FAIL" in capsys.readouterr().err and not (tmp_path / "r2").exists()
