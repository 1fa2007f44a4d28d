"""Per-document LoRA's layouts: today's (one adapter per linear) is unchanged bit for bit; the 1.0611 record's
(one set per layer call on q, k, v, o and the MLP, a head adapter, A kept warm across document groups) has
the adapters it should, each call takes its own, and scoring stays score-first and isolated per document."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpt.ttt as ttt_mod
from gpt.model import GPT, ModelConfig
from gpt.scoring import document_spans, kept_logits
from gpt.ttt import LORA_TARGETS, EvalLoop, LoRA, TTTConfig
from stages import compliance as C
from tests.eval_worker import BOS, SEQ_LEN, VARIANTS, VOCAB, run_variant, toy_model, toy_stream


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def looped_model(seed: int = 1) -> GPT:
    """3 blocks, the middle one run 3 times (5 layer calls), the last one a two-lane parallel block."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=VOCAB, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, bos_id=BOS,
                            recur_start=1, recur_end=1, recur_passes=3, parallel_from=2, parallel_lanes=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def tokens(rows: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (rows, T), generator=torch.Generator().manual_seed(seed))


class TodaysLoRA:
    """The LoRA as it was before lora_layout, lora_head and lora_warm_a (begin/end added as no-ops)."""

    def __init__(self, model, rows, cfg, device):
        mods = [m for n, m in model.named_modules() if LORA_TARGETS.fullmatch(n)]
        g = torch.Generator().manual_seed(cfg.seed)
        self.A = [torch.nn.Parameter(((torch.rand(m.in_features, cfg.lora_rank, generator=g) * 2 - 1)
                                      / math.sqrt(m.in_features)).to(device).expand(rows, -1, -1).clone())
                  for m in mods]
        self.B = [torch.nn.Parameter(torch.zeros(rows, cfg.lora_rank, m.out_features, device=device)) for m in mods]
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.rows = None
        self.hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(mods)]

    def _hook(self, i):
        def add(module, inputs, out):
            x = inputs[0]
            A, B = (self.A[i], self.B[i]) if self.rows is None else (self.A[i][self.rows], self.B[i][self.rows])
            return out + (x @ A.to(x.dtype)) @ B.to(x.dtype) * self.scale
        return add

    def begin(self, keep=None):
        pass

    def end(self):
        pass

    def params(self):
        return self.A + self.B

    def remove(self):
        for h in self.hooks:
            h.remove()


def _fixed(name, model, **kw):
    from tests.eval_worker import SEQ_LEN
    loop = EvalLoop(copy.deepcopy(model), toy_stream(), seq_len=SEQ_LEN, batch_seqs=4, device="cpu", bos_id=BOS,
                    **{**VARIANTS[name], **kw})
    loop.fixed = True
    return loop.run()


def test_the_defaults_reproduce_todays_lora_bit_for_bit(monkeypatch):
    runs = [(name, model, fixed) for name in ("lora", "phased") for model in (toy_model(), looped_model())
            for fixed in (False, True)]
    now = [(_fixed if fixed else lambda n, m: run_variant(n, model=m))(name, model) for name, model, fixed in runs]
    monkeypatch.setattr(ttt_mod, "LoRA", TodaysLoRA)
    for (name, model, fixed), a in zip(runs, now):
        b = (_fixed if fixed else lambda n, m: run_variant(n, model=m))(name, model)
        assert np.array_equal(a["nll"], b["nll"]), (name, fixed)
        assert a["events"] == b["events"] and a["adapt_steps"] == b["adapt_steps"] > 0


@pytest.mark.parametrize("active", [True, False])
def test_record_layout_has_one_adapter_per_layer_call_and_target(active):
    model = looped_model()
    model.recurrence_active = active
    calls = 5 if active else 3  # blocks 0, 1, 1, 1, 2 with the loop; 0, 1, 2 without
    for head in (False, True):
        lora = LoRA(model, 2, TTTConfig(lora_layout="record", lora_head=head), "cpu")
        assert len(lora.A) == len(lora.B) == calls * 5 + head
        for kind, (fi, fo) in {"attn.q": (32, 32), "attn.k": (32, 16), "attn.v": (32, 16), "attn": (32, 32),
                               "mlp": (32, 32)}.items():
            mine = [(n, f) for n, f in zip(lora.names, lora.fans)
                    if n != "head" and n.split(".", 2)[2].split("@")[0] == kind]
            assert sorted(int(n.split("@")[1]) for n, _ in mine) == list(range(calls)), kind  # one per call
            assert {f for _, f in mine} == {(fi, fo)}, kind
        assert lora.names[-1] == "head" and lora.fans[-1] == (32, VOCAB) if head else "head" not in lora.names
        assert all(B.shape[0] == 2 and not B.any() for B in lora.B)
        lora.remove()
    # today's layout: one adapter per linear layer, whatever the loop
    assert len(LoRA(model, 2, TTTConfig(), "cpu").A) == 3 * 6


def _capture(module):
    """A hook after LoRA's: every call's (input, output) as the model sees them."""
    seen = []
    return seen, module.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), o.detach().clone())))


@pytest.mark.parametrize("target", ["attn.q", "attn.v", "attn", "mlp"])
def test_each_call_takes_its_own_adapter_on_the_modules_input_and_output(target):
    """Block 1 runs 3 times (slots 1, 2, 3); the adapter of slot 2 moves the second call's output by exactly
    input @ A @ B * alpha / rank (o: the attention's normed input to its output; mlp: the MLP's) and no
    call before it."""
    model = looped_model()
    lora = LoRA(model, 2, TTTConfig(lora_layout="record"), "cpu")
    module = model.get_submodule(f"blocks.1.{target}")
    seen, handle = _capture(module)
    x = tokens()
    with torch.no_grad():
        lora.begin()
        model.hidden(x)
        lora.end()
        base = list(seen)
        j = lora.names.index(f"blocks.1.{target}@2")
        lora.B[j].normal_()
        seen.clear()
        lora.begin()
        model.hidden(x)
        lora.end()
    handle.remove()
    assert len(seen) == len(base) == 3
    assert torch.equal(seen[0][1], base[0][1])  # slot 1: its own adapter, still zero
    inp, out = seen[1]
    assert torch.equal(inp, base[1][0])  # nothing before changed the second call's input
    expected = (inp @ lora.A[j]) @ lora.B[j] * lora.scale
    torch.testing.assert_close(out - base[1][1], expected, rtol=1e-4, atol=1e-6)


def test_every_adapter_is_used_and_the_layer_plan_is_checked():
    model = looped_model()
    lora = LoRA(model, 2, TTTConfig(lora_layout="record", lora_head=True), "cpu")
    with torch.no_grad():
        for B in lora.B:
            B.normal_()
    x = tokens()
    keep = torch.ones_like(x, dtype=torch.bool)
    lora.begin(keep)
    logits = kept_logits(model, x, keep)
    lora.end()
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.params())
    model.recurrence_active = False  # fewer calls than the adapters were made for
    lora.begin(keep)
    with torch.no_grad():
        kept_logits(model, x, keep)
    with pytest.raises(RuntimeError, match="the layer plan has 3"):
        lora.end()
    lora.remove()


def test_head_adapter_moves_the_logits_only_after_a_step_and_before_the_softcap():
    model = looped_model()
    x = tokens(rows=3)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[0, 4:9] = keep[1, :3] = keep[2, 7:] = True
    with torch.no_grad():
        plain = kept_logits(model, x, keep)
    lora = LoRA(model, 3, TTTConfig(lora_head=True, lora_lr=0.01), "cpu")
    row = keep.nonzero()[:, 0]
    lora.begin(keep)
    start = kept_logits(model, x, keep)
    lora.end()
    assert torch.equal(start, plain)  # B = 0: the model's own logits, bit for bit
    opt = torch.optim.AdamW(lora.params(), lr=0.05)
    y = torch.randint(2, VOCAB, (int(keep.sum()),), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # only row 0 is trained on
        lora.begin(keep)
        loss = (F.cross_entropy(kept_logits(model, x, keep), y, reduction="none") * (row == 0)).sum()
        lora.end()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lora.B[-1][0].abs().sum() > 0 and not lora.B[-1][1:].any()
    with torch.no_grad():
        lora.begin(keep)
        h = model.hidden(x)[keep]
        after = model.project(h)
        lora.end()
        assert not torch.allclose(after[row == 0], plain[row == 0])
        assert torch.equal(after[row > 0], plain[row > 0])  # rows never trained on: B = 0 still
        cap = model.cfg.logit_softcap
        h0 = h[row == 0]
        pre = F.linear(h0, model.embed.weight) + (h0 @ lora.A[-1][0]) @ lora.B[-1][0] * lora.scale
        torch.testing.assert_close(after[row == 0], cap * torch.tanh(pre / cap))
    lora.remove()
    assert "project" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(kept_logits(model, x, keep), plain)  # removed: the model's own logits again


@pytest.mark.parametrize("warm", [False, True])
def test_reset_zeroes_b_and_keeps_a_only_when_warm(warm):
    model = looped_model()
    lora = LoRA(model, 3, TTTConfig(lora_layout="record", lora_head=True, lora_warm_a=warm), "cpu")
    drawn = [A.detach().clone() for A in lora.A]
    with torch.no_grad():
        for p in lora.params():
            p.add_(torch.randn_like(p))
    learned = [A.detach().clone() for A in lora.A]
    lora.rows = torch.tensor([0, 2])
    lora.reset()
    assert lora.rows is None and not any(B.any() for B in lora.B)
    assert all(torch.equal(A, a) for A, a in zip(lora.A, learned if warm else drawn))


@pytest.mark.parametrize("name", ["lora", "phased"])
def test_warm_a_carries_from_group_to_group_and_is_drawn_anew_each_phase(name, monkeypatch):
    made, resets = [], []
    init, reset = LoRA.__init__, LoRA.reset

    def spy_init(self, *a, **k):
        made.append(self)
        init(self, *a, **k)

    def spy_reset(self):
        before = [A.detach().clone() for A in self.A]
        reset(self)
        resets.append((before, [A.detach().clone() for A in self.A], self._draw()))
    monkeypatch.setattr(LoRA, "__init__", spy_init)
    monkeypatch.setattr(LoRA, "reset", spy_reset)
    groups = []
    lora_group = EvalLoop.lora_group
    monkeypatch.setattr(EvalLoop, "lora_group", lambda self, g: (groups.append(g), lora_group(self, g))[1])
    res = run_variant(name, ttt=replace(VARIANTS[name]["ttt"], lora_layout="record", lora_warm_a=True))
    segments = 1 if name == "lora" else 3  # phased: boundaries after 4 and 8 of the 14 documents
    assert len(made) == segments and len(resets) == len(groups) - segments > 0
    for before, after, drawn in resets:
        assert all(torch.equal(a, b) for a, b in zip(after, before))  # A as the group before left it...
        assert not all(torch.equal(a.expand_as(b), b) for a, b in zip(drawn, before))  # ...which had learnt
    assert C.check_ttt_order(res["events"], len(res["nll"]))["status"] == "PASS"


LAYOUTS = {"record": dict(lora_layout="record"), "head": dict(lora_head=True), "warm": dict(lora_warm_a=True),
           "all": dict(lora_layout="record", lora_head=True, lora_warm_a=True)}


@pytest.mark.parametrize("name", ["lora", "phased"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_new_layouts_score_first_then_adapt(name, layout):
    """Every document's first chunk is scored with B = 0 (warm A or not): the no-TTT score exactly
    (phased: in the first segment); the rest has moved, for the better."""
    res = run_variant(name, ttt=replace(VARIANTS[name]["ttt"], **LAYOUTS[layout]))
    plain = run_variant("isolated")
    n = len(res["nll"])
    order = C.check_ttt_order(res["events"], n)
    assert order["status"] == "PASS", order["evidence"]
    spans = document_spans(toy_stream(), BOS)
    C_ = VARIANTS[name]["ttt"].lora_chunk
    first = np.concatenate([np.arange(a, min(a + C_, b, n))
                            for a, b in (spans[d] for d in (range(len(spans)) if name == "lora" else range(4)))])
    assert np.array_equal(res["nll"][first], plain["nll"][first])
    rest = np.setdiff1d(np.arange(n), first)
    assert np.abs(res["nll"][rest] - plain["nll"][rest]).max() > 1e-3
    assert res["nll"].mean() < plain["nll"].mean()


@pytest.mark.parametrize("warm", [False, True])
def test_documents_stay_isolated_but_for_the_warm_a_carry(warm, monkeypatch):
    """The later tokens of one document of the first group are replaced. Its earlier scores, the other
    documents of its group and (no warm A) every other document are bit-identical; with warm A, documents
    of later groups (which inherit the adapters' A) may move, and some do."""
    cfg = replace(VARIANTS["lora"]["ttt"], lora_layout="record", lora_head=True, lora_warm_a=warm)
    groups = []
    lora_group = EvalLoop.lora_group
    monkeypatch.setattr(EvalLoop, "lora_group", lambda self, g: (groups.append(list(g)), lora_group(self, g))[1])
    stream = toy_stream()
    before = run_variant("lora", ttt=cfg)["nll"]
    order, n = list(groups), len(stream) - 1
    spans = [(a, min(b, n)) for a, b in document_spans(stream, BOS)]
    d = order[0][0]
    a, b = spans[d]
    t = a + (b - a) // 2
    changed = stream.copy()
    changed[t + 1:b] = np.random.default_rng(5).integers(2, VOCAB, size=b - t - 1)
    groups.clear()
    after = run_variant("lora", tokens=changed, ttt=cfg)["nll"]
    assert groups == order
    assert np.array_equal(before[a:t], after[a:t]) and not np.array_equal(before[t:b], after[t:b])
    moved = []
    for g, docs in enumerate(order):
        for e in docs:
            if e != d:
                same = np.array_equal(before[slice(*spans[e])], after[slice(*spans[e])])
                assert same or (warm and g > 0), (e, g)
                moved += [] if same else [e]
    assert bool(moved) == warm


class AlwaysIsolating(GPT):
    """The model as it was: it builds its isolating mask in every forward, whatever the eval says."""

    @property
    def rows_are_documents(self):
        return False

    @rows_are_documents.setter
    def rows_are_documents(self, value):
        pass


@pytest.mark.parametrize("name", ["isolated", "sgd_isolated", "lora", "phased"])
def test_isolated_rows_skip_the_mask_and_score_the_same(name, monkeypatch):
    """Isolated windows and LoRA's rows each hold one document (a BOS only at a row's start), so a model trained
    with doc_isolation scores them with plain causal attention: no mask is built for them (SGD's stream sequences
    still get theirs), the scores are those of the masked model, and the switch is off again after the loop."""
    import gpt.model as model_mod
    cfg = ModelConfig(vocab_size=VOCAB, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, bos_id=BOS,
                      recur_start=1, recur_end=1, recur_passes=3, doc_isolation=True)
    torch.manual_seed(3)
    fast, masked = GPT(cfg), AlwaysIsolating(cfg)
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.05)
    masked.load_state_dict(fast.state_dict())
    built = []
    real = model_mod.document_mask
    monkeypatch.setattr(model_mod, "document_mask", lambda *a: (built.append(a[0].shape), real(*a))[1])
    ttt = VARIANTS[name].get("ttt")
    kw = {"ttt": replace(ttt, lora_layout="record")} if name in ("lora", "phased") else {}
    args = dict(seq_len=SEQ_LEN, batch_seqs=4, device="cpu", bos_id=BOS, **{**VARIANTS[name], **kw})
    with_mask = EvalLoop(masked.eval(), toy_stream(), **args).run()
    old_builds = len(built)
    assert old_builds  # the old path builds a mask in every forward
    built.clear()
    model = fast.eval()
    res = EvalLoop(model, toy_stream(), **args).run()
    assert model.rows_are_documents is False
    if name in ("isolated", "lora"):
        assert built == []
    else:  # SGD's sequences run through the stream, across documents: those steps still isolate, and only they
        assert 0 < len(built) < old_builds
    np.testing.assert_allclose(res["nll"], with_mask["nll"], rtol=0, atol=2e-5)
    # documents cut at another BOS than the model's: the model's own isolation is kept
    built.clear()
    EvalLoop(model, toy_stream(), **{**args, "bos_id": BOS + 1}).run()
    assert built
    # a stream window that crosses documents still needs the mask: without doc isolation the eval leaves it on
    built.clear()
    EvalLoop(model, toy_stream(), seq_len=SEQ_LEN, batch_seqs=4, device="cpu", bos_id=BOS, stride=0,
             doc_isolation=False, ttt=TTTConfig()).run()
    assert built


@pytest.mark.parametrize("name", ["lora", "phased_record"])
def test_compiled_dynamic_lora_scores_as_eager_with_one_graph_warmed_up(name, monkeypatch):
    """lora_compile=dynamic (on CUDA; here on the CPU with dynamo's graphs run by aot_eager): the adapted forward is
    one compiled graph for every window length and batch size, reached by the warm-up (nothing compiles in the timed
    loop), and the exact-length batches that drop finished documents score what the padded eager batches do, with
    the same adapt steps and timeline. On the CPU without the switch it stays eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from gpt.ttt import lora_compile_mode, warm_up
    base = VARIANTS[name]
    dyn = replace(base["ttt"], lora_compile="dynamic")
    assert lora_compile_mode(dyn, torch.device("cpu")) == "off"  # the default on the CPU: nothing is compiled
    eager = _fixed(name, looped_model(), ttt=base["ttt"])  # padded, every row: what CUDA ran before
    monkeypatch.setattr(ttt_mod, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(ttt_mod, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(ttt_mod, "_COMPILED_HIDDEN", {})
    torch._dynamo.reset()
    model = looped_model()
    loop_args = dict(seq_len=SEQ_LEN, stride=base["stride"], batch_seqs=4, device="cpu", doc_isolation=True)
    before = counters["stats"]["unique_graphs"]
    warm_up(copy.deepcopy(model), VOCAB, BOS, 4 * SEQ_LEN, ttt=dyn, **loop_args)
    # one graph for LoRA's forward (phased: plus the SGD phases' own, eager model: none)
    assert counters["stats"]["unique_graphs"] - before == 1
    res = _fixed(name, model, ttt=dyn)
    assert res["graphs_compiled_in_loop"] == 0
    np.testing.assert_allclose(res["nll"], eager["nll"], rtol=0, atol=1e-5)
    assert res["events"] == eager["events"] and res["adapt_steps"] == eager["adapt_steps"] > 0
    assert res["lora_positions"] < eager["lora_positions"]  # no padding, no finished rows computed
    torch._dynamo.reset()
