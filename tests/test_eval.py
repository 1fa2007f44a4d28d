"""The eval loop and stage: score-first TTT is legal and causal, two ranks agree with one process, the time
budget stops or fails, and the shipped program reproduces the stage's score with TTT on."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts import run_stage
from golf.config import apply_overrides
from stages import compliance as C
from stages import evaluate
from gpt.scoring import document_spans
from gpt.ttt import EvalBudgetError, TTTConfig
from tests.eval_worker import BOS, VARIANTS, VOCAB, run_variant, toy_stream

ROOT = Path(__file__).resolve().parent.parent
TTT_VARIANTS = ["sgd", "sgd_isolated", "lora", "phased", "phased_record"]
NO_TTT = {"sgd": "sliding", "sgd_isolated": "isolated", "lora": "isolated", "phased": "isolated",
          "phased_record": "isolated"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as each torchrun worker has: float results then compare bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def single(one_thread):
    return {name: run_variant(name) for name in VARIANTS}


@pytest.mark.parametrize("name", TTT_VARIANTS)
def test_ttt_scores_first_then_adapts(name, single):
    res, plain = single[name], single[NO_TTT[name]]
    n = len(res["nll"])
    order = C.check_ttt_order(res["events"], n)
    assert order["status"] == "PASS", order["evidence"]
    assert res["adapt_steps"] > 0
    # what is scored before any adaptation equals the no-TTT score exactly; what comes after has moved
    if name.startswith("sgd"):
        first = np.arange(VARIANTS[name]["ttt"].chunk_tokens)
    else:  # every document's first chunk is scored with fresh adapters (phased: the first segment's documents)
        spans = document_spans(toy_stream(), BOS)
        docs = range(len(spans)) if name == "lora" else range(4)  # phase_docs 8 in 2 phases: the first 4 documents
        first = np.concatenate([np.arange(a, min(a + VARIANTS[name]["ttt"].lora_chunk, b, n))
                                for a, b in (spans[d] for d in docs)])
    assert np.array_equal(res["nll"][first], plain["nll"][first])
    rest = np.setdiff1d(np.arange(n), first)
    assert np.abs(res["nll"][rest] - plain["nll"][rest]).max() > 1e-3
    assert res["nll"].mean() < plain["nll"].mean()  # the repeated phrase is learnt


@pytest.mark.parametrize("name", list(VARIANTS))
def test_changing_later_tokens_never_moves_earlier_scores(name, single):
    """Causality with TTT on and off: tokens after position t are replaced (not by BOS, so the documents
    keep their lengths); the scores of tokens 1..t (targets 0..t-1) are bit-identical."""
    tokens = toy_stream()
    for t in (137, 450, 700):
        changed = tokens.copy()
        rng = np.random.default_rng(t)
        changed[t + 1:] = np.where(tokens[t + 1:] == BOS, BOS, rng.integers(2, VOCAB, size=len(tokens) - t - 1))
        after = run_variant(name, changed)["nll"]
        before = single[name]["nll"]
        assert np.array_equal(before[:t], after[:t]), (name, t, int(np.flatnonzero(before[:t] != after[:t])[0]))
        assert not np.array_equal(before[t:], after[t:])


def test_two_ranks_agree_with_one_process(single, tmp_path):
    """2 gloo processes: without TTT the windows are split batch by batch, so the scores are bit-identical;
    with TTT the gradient sums run in another order (float rounding only), and the merged log is legal."""
    out = tmp_path / "dist.pkl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.eval_worker", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_res = pickle.loads(out.read_bytes())
    stop = dist_res.pop("lora_stop")  # (the loop itself fails unless every target was scored exactly once)
    assert stop["budget_stop"] and 0 < stop["adapt_steps"] < single["lora"]["adapt_steps"]
    assert C.check_ttt_order(stop["events"], len(stop["nll"]))["status"] == "PASS"
    for name in ("plain", "sliding", "isolated"):
        assert np.array_equal(dist_res[name]["nll"], single[name]["nll"]), name
    for name in TTT_VARIANTS:
        a, b = dist_res[name], single[name]
        assert a["adapt_steps"] == b["adapt_steps"]
        np.testing.assert_allclose(a["nll"], b["nll"], rtol=0, atol=1e-5, err_msg=name)  # measured: < 1e-6
        assert a["nll"].sum() == pytest.approx(b["nll"].sum(), rel=1e-8)
        order = C.check_ttt_order(a["events"], len(a["nll"]))
        assert order["status"] == "PASS", (name, order["evidence"])


def test_budget_fails_early_or_stops_adapting():
    with pytest.raises(EvalBudgetError, match="over its 0 s budget"):
        run_variant("sgd", budget_s=1e-4, on_budget="fail")
    for name in ("sgd", "lora"):
        full = run_variant(name)
        stopped = run_variant(name, budget_s=1e-4, on_budget="stop")
        assert stopped["budget_stop"]["done_fraction"] < 1
        assert 0 < stopped["adapt_steps"] < full["adapt_steps"]
        assert C.check_ttt_order(stopped["events"], len(stopped["nll"]))["status"] == "PASS"
        assert np.isfinite(stopped["nll"]).all()
    # time spent before the loop (the weights decode) counts towards the budget
    with pytest.raises(EvalBudgetError):
        run_variant("sgd", budget_s=5.0, spent_s=10.0, on_budget="fail")


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="ttt.method must be one of"):
        TTTConfig(method="slot")
    with pytest.raises(ValueError, match="ttt.lora_layout must be one of linears, record, not 'slots'"):
        TTTConfig(lora_layout="slots")
    for name in ("lora_head", "lora_warm_a"):
        with pytest.raises(ValueError, match=f"ttt.{name} must be true or false"):
            TTTConfig(**{name: 1})
    with pytest.raises(evaluate.EvalConfigError, match="doc_isolation=true"):
        evaluate.check_config(evaluate.EvalConfig(ttt=TTTConfig(method="lora")))
    with pytest.raises(evaluate.EvalConfigError, match="on_budget"):
        evaluate.check_config(evaluate.EvalConfig(on_budget="warn"))


# --- the stage on the pipeline's artifacts --------------------------------------------------------------------------
TTT_SET = ["eval.ttt.method=sgd", "eval.ttt.chunk_tokens=2048", "eval.ttt.epochs=1", "eval.ttt.batch_seqs=4",
           "eval.stride=128", "eval.max_tokens=6144"]


def _stage(cfg, results, store):
    return run_stage(evaluate.STAGE, cfg.eval, {r: results[r].artifact for r in evaluate.STAGE.inputs}, store).artifact


def test_stage_writes_the_ledger_and_a_legal_log_and_the_shipped_program_agrees(pipeline_run, tmp_path):
    store, cfg, results = pipeline_run
    ev = _stage(apply_overrides(cfg, TTT_SET), results, store)
    info = json.loads(ev.file("eval.json").read_text())
    # 3 chunks, the last one not adapted on; each chunk's 8 sequences of 256 tokens in 2 steps
    assert info["ttt"] == "sgd" and info["doc_isolation"] is False and info["adapt_steps"] == 4
    assert info["timer_includes"] and any("warm-up" in x for x in info["timer_excludes"])
    counted, excluded = C.eval_ledger(ev)
    assert sum(counted.values()) == pytest.approx(info["total_eval_seconds"], abs=0.01)
    assert "pre-quantization diagnostic" in excluded
    nll = np.load(ev.file("token_nll.npy"))
    assert len(nll) == 6143 and info["ttt_gain_bpb"] != 0
    assert C.check_ttt_order(C.read_ttt_log(ev.file("ttt_log.jsonl")), len(nll), True)["status"] == "PASS"
    # the wrapped program that ships, alone, with the same TTT settings
    q, tok = results["quantize"].artifact, results["tokenize"].artifact
    ds = evaluate.Dataset.open(tok)
    for name in ("shipped_code.py", "weights.bin"):
        (tmp_path / name).write_bytes(q.file(name).read_bytes())
    t = json.dumps({"method": "sgd", "chunk_tokens": 2048, "epochs": 1, "batch_seqs": 4})
    proc = subprocess.run([sys.executable, "shipped_code.py", "--tokenizer", str(ds.tokenizer_path), "--val",
                           *map(str, ds.shard_paths("val")), "--seq-len", str(cfg.eval.seq_len), "--stride", "128",
                           "--max-tokens", "6144", "--batch-seqs", str(cfg.eval.batch_seqs), "--ttt", t],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["val_bpb"] == pytest.approx(info["val_bpb"], rel=1e-6) and out["val_bytes"] == info["val_bytes"]


def test_stage_on_two_processes_matches_one(pipeline_run, store):
    """nproc=2 launches torchrun (gloo); per-document LoRA over documents split between the ranks."""
    _, cfg, results = pipeline_run
    base = apply_overrides(cfg, ["eval.doc_isolation=true", "eval.ttt.method=lora", "eval.ttt.lora_chunk=64",
                                 "eval.ttt.lora_docs=4", "eval.max_tokens=4096", "eval.pre_quant=false",
                                 "eval.no_ttt_diagnostic=false"])
    one = _stage(base, results, store)
    two = _stage(apply_overrides(base, ["eval.nproc=2"]), results, store)
    assert two.metrics["world_size"] == 2 and one.metrics["world_size"] == 1
    assert two.metrics["val_bpb"] == pytest.approx(one.metrics["val_bpb"], rel=1e-5)
    nll = np.load(two.file("token_nll.npy"))
    assert C.check_ttt_order(C.read_ttt_log(two.file("ttt_log.jsonl")), len(nll), True)["status"] == "PASS"


def test_cuda_batch_shapes_give_the_same_scores(single):
    """The fixed, padded batch shapes used on CUDA (power-of-two lengths, full rows), run here on the CPU."""
    from gpt.ttt import EvalLoop
    from tests.eval_worker import SEQ_LEN, toy_model
    for name, kw in VARIANTS.items():
        loop = EvalLoop(toy_model(), toy_stream(), seq_len=SEQ_LEN, batch_seqs=4, device="cpu", bos_id=BOS, **kw)
        loop.fixed = True
        res = loop.run()
        np.testing.assert_allclose(res["nll"], single[name]["nll"], rtol=0, atol=1e-6, err_msg=name)  # measured: < 1e-7
        assert res["adapt_steps"] == single[name]["adapt_steps"]


class _ShapeRecorder(torch.nn.Module):
    """A stand-in model that records (rows, length, grad) of every forward: what a compiled model compiles."""

    def __init__(self, vocab: int = 64, dim: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].attn = torch.nn.Module()
        self.blocks[0].attn.q = torch.nn.Linear(dim, dim)  # a LoRA target
        self.head = torch.nn.Linear(dim, vocab)
        self.seen: set = set()

    def hidden(self, x):
        self.seen.add((tuple(x.shape), torch.is_grad_enabled()))
        return self.blocks[0].attn.q(self.emb(x))

    def project(self, h):
        return self.head(h).float()


def _shapes_as_rank(model, tokens, ttt, rank, world, **loop_args):
    """The shapes one rank of a ``world``-rank eval uses (its share, its batch sizes; collectives skipped)."""
    from gpt.ttt import EvalLoop
    loop = EvalLoop(model, tokens, bos_id=1, ttt=ttt, **loop_args)
    loop.rank, loop.world, loop.shape_world = rank, world, world
    loop._starts, loop._ends, loop.t0 = [w[2] for w in loop.windows], [w[3] for w in loop.windows], 0.0
    {"none": loop.run_plain, "sgd": loop.run_sgd, "lora": loop.run_docs}[ttt.method]()
    return model.seen


@pytest.mark.parametrize("method", ["none", "sgd", "lora"])
def test_the_warm_up_reaches_every_batch_shape_on_every_rank(method, monkeypatch):
    """On CUDA batches have fixed shapes (padded lengths 128, 256, ... seq_len); a shape the warm-up did not
    reach compiles inside the timed loop. Each rank's share of a real-looking stream must use only shapes
    the warm-up compiled, whatever the rank and the world size."""
    import torch.distributed as dist
    from gpt.ttt import warm_up
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: None)
    L = 512
    ttt = TTTConfig(method=method, lora_docs=4, lora_chunk=48, chunk_tokens=2048, epochs=1, batch_seqs=8)
    loop_args = dict(seq_len=L, stride=64, batch_seqs=8, device="cpu", doc_isolation=True, fixed=True)
    rng = np.random.default_rng(3)
    docs = [np.concatenate([[1], rng.integers(2, 64, int(min(rng.lognormal(5.5, 1.0), 4 * L)))]) for _ in range(160)]
    stream = np.concatenate(docs)
    for world in (1, 4):
        warm = _ShapeRecorder()
        with monkeypatch.context() as m:  # rank 0 of `world` ranks, recording on the model warm_up is given
            m.setattr("copy.deepcopy", lambda model: model)
            m.setattr(dist, "is_initialized", lambda: True)
            m.setattr(dist, "get_rank", lambda: 0)
            m.setattr(dist, "get_world_size", lambda: world)
            warm_up(warm, 64, 1, max(4 * L, 2 * ttt.chunk_tokens), ttt=ttt, **loop_args)
        for rank in range(world):
            used = _shapes_as_rank(_ShapeRecorder(), stream, ttt, rank, world, **loop_args)
            assert used <= warm.seen, (world, rank, sorted(used - warm.seen))
