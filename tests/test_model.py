"""The model's record-class features: each does what it says, and none leaks across documents."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gpt.model import GPT, ModelConfig, flops_per_token
from gpt.optim import Muon, newton_schulz

BASE = ModelConfig(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0)


def randomised(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would hide every feature
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tokens_with_docs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, 64, (2, 48), generator=g)
    idx[:, 0] = 1
    idx[:, 20] = 1  # a second document starts at position 20
    return idx


ALL_FEATURES = dataclasses.replace(BASE, mlp_activation="leaky_relu2", rope_dims=4, ln_scale=True, xsa=True,
                                   smear_gate=True, recur_start=1, recur_end=2, parallel_from=3,
                                   bigram_buckets=97, bigram_dim=8, doc_isolation=True)


def test_document_isolation_blocks_every_path_across_bos():
    """With isolation on, nothing in document 1 changes any score in document 2 (smear, bigram, attention)."""
    model = randomised(ALL_FEATURES)
    idx = tokens_with_docs()
    changed = idx.clone()
    changed[:, 1:20] = torch.randint(2, 64, (2, 19), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model.logits(idx), model.logits(changed)
    assert torch.equal(a[:, 20:], b[:, 20:])
    assert not torch.allclose(a[:, 1:20], b[:, 1:20])


def test_without_isolation_the_next_document_sees_the_previous_one():
    model = randomised(dataclasses.replace(ALL_FEATURES, doc_isolation=False))
    idx = tokens_with_docs()
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 62 + 2
    with torch.no_grad():
        assert not torch.allclose(model.logits(idx)[:, 20:], model.logits(changed)[:, 20:])


def test_smear_gate_never_mixes_into_a_bos():
    model = randomised(dataclasses.replace(BASE, smear_gate=True))
    x = torch.randn(1, 6, 32)
    idx = torch.tensor([[1, 5, 6, 1, 7, 8]])
    out = model.smear(x, idx)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, 3], x[:, 3])
    assert not torch.equal(out[:, 4], x[:, 4])


def test_causality_with_all_features():
    model = randomised(dataclasses.replace(ALL_FEATURES, doc_isolation=False))
    idx = tokens_with_docs()
    changed = idx.clone()
    changed[:, 30:] = 3
    with torch.no_grad():
        assert torch.equal(model.logits(idx)[:, :30], model.logits(changed)[:, :30])


def test_xsa_output_is_orthogonal_to_the_value():
    torch.manual_seed(0)
    cfg = dataclasses.replace(BASE, xsa=True, num_kv_heads=4)
    attn = randomised(cfg).blocks[0].attn
    captured = {}
    attn.out.register_forward_hook(lambda m, i, o: captured.setdefault("y", i[0]))
    x = torch.randn(1, 10, 32)
    from gpt.model import DocumentMask
    attn(x, DocumentMask())
    v = attn.v(x).view(1, 10, 4, 8)
    y = captured["y"].view(1, 10, 4, 8)
    assert (y * v).sum(-1).abs().max() < 1e-5


def test_xsa_with_grouped_heads_removes_each_heads_own_kv_direction():
    """8 query heads on 2 KV heads: head h shares value head h // 4 (the GQA mapping), and XSA must project
    out exactly that one."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(BASE, xsa=True, num_heads=8, num_kv_heads=2, model_dim=64)
    attn = randomised(cfg).blocks[0].attn
    captured = {}
    attn.out.register_forward_hook(lambda m, i, o: captured.setdefault("y", i[0]))
    x = torch.randn(2, 12, 64)
    from gpt.model import DocumentMask
    attn(x, DocumentMask())
    v = attn.v(x).view(2, 12, 2, 1, 8)
    y = captured["y"].view(2, 12, 2, 4, 8)
    assert (y * v).sum(-1).abs().max() < 1e-5
    # and the output is the plain attention output minus only that component
    attn.xsa = False
    captured.clear()
    attn(x, DocumentMask())
    plain = captured["y"].view(2, 12, 2, 4, 8)
    vn = v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, plain - (plain * vn).sum(-1, keepdim=True) * vn, atol=1e-6, rtol=1e-5)


def test_recurrence_replays_the_span_and_can_be_switched():
    model = randomised(dataclasses.replace(BASE, recur_start=1, recur_end=2))
    assert [i for i, _ in model.layer_order()] == [0, 1, 2, 1, 2, 3]
    idx = tokens_with_docs()
    with torch.no_grad():
        on = model.logits(idx)
        model.recurrence_active = False
        assert [i for i, _ in model.layer_order()] == [0, 1, 2, 3]
        off = model.logits(idx)
    assert not torch.allclose(on, off)
    cfg = dataclasses.replace(BASE, recur_start=1, recur_end=2)
    assert flops_per_token(cfg, 128, recurrence=True) > flops_per_token(cfg, 128)


def test_bad_spans_and_shapes_are_refused():
    with pytest.raises(ValueError, match="recurrence span"):
        dataclasses.replace(BASE, recur_start=2, recur_end=9)
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(BASE, num_heads=5)


@pytest.mark.parametrize("schedule", ["ns5", "polar_express"])
def test_orthogonalisation_brings_singular_values_near_one(schedule):
    torch.manual_seed(0)
    g = torch.randn(64, 32) @ torch.diag(torch.logspace(-2, 0, 32))
    s = torch.linalg.svdvals(newton_schulz(g, 5, schedule))
    lo, hi = (0.5, 1.3) if schedule == "ns5" else (0.75, 1.15)
    assert s.min() > lo and s.max() < hi, (s.min(), s.max())


def test_muon_variants_train_a_small_model():
    for kw in ({}, {"schedule": "polar_express", "row_norm": True, "weight_decay": 0.1}):
        model = randomised(BASE)
        model.train()
        mats = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.") and "resid" not in n]
        opt = Muon(mats, lr=0.02, **kw)
        idx = tokens_with_docs()
        losses = []
        for _ in range(8):
            loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            model.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.1, (kw, losses)


def test_muon_row_norm_equalises_rows_of_tiny_gradients_too():
    """MuonEq-R floors each row's L2 norm at 1e-7, as the record script does: a gradient whose rows have an RMS
    under that floor (but norms over it), as behind the zero-initialised projections early in training, gets the
    same update as the same gradient at any scale (Newton-Schulz removes the scale). A floor on the RMS held such
    rows down instead: the update differed from the script's at the first step."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 512, generator=gen) * torch.linspace(1, 10, 64)[:, None]  # rows of unequal norms
    updates = []
    for scale in (1.0, 6e-9):  # at 6e-9 the rows' RMS is 6e-9 to 6e-8, their norms 1.4e-7 to 1.4e-6
        p = torch.nn.Parameter(torch.zeros(64, 512))
        p.grad = g * scale
        Muon([p], lr=0.02, schedule="polar_express", row_norm=True).step()
        updates.append(p.detach().clone())
    tiny = g * 6e-9
    assert (tiny.norm(dim=1) > 1e-7).all() and (tiny.pow(2).mean(dim=1).sqrt() < 1e-7).all()  # the case meant
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("softcap", [30.0, 0.0])
def test_fused_loss_matches_the_plain_loss_and_gradients(softcap):
    from gpt.losses import fused_softcap_cross_entropy
    cfg = dataclasses.replace(BASE, logit_softcap=softcap)
    plain = randomised(cfg)
    fused = randomised(cfg)
    fused.loss_fn = lambda h, w, t, cap: fused_softcap_cross_entropy(h, w, t, cap, chunk=17)  # uneven chunks
    idx = tokens_with_docs()
    losses = []
    for m in (plain, fused):
        m.train()
        loss = m(idx[:, :-1], idx[:, 1:]) * 3.0  # a non-unit upstream gradient
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (n, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """flash-attn's varlen contract in plain torch: (tokens, heads, D) inputs, each cu_seqlens segment
    attended causally on its own; returns (out, lse) as some FA3 builds do."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal and cu_seqlens_q.dtype == torch.int32
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16)  # flash-attn's rule
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert max_seqlen_q >= max(lengths) and int(cu_seqlens_q[-1]) == q.size(0)
    outs = []
    for a, n in zip(cu_seqlens_q[:-1].tolist(), lengths):
        qs, ks, vs = (t[a:a + n].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs), None


def test_flash_varlen_path_isolates_documents_like_the_dense_mask(monkeypatch):
    """The flash-attn path (packing, cu_seqlens with row starts, GQA heads, one half dtype, output layout)
    against the dense per-document mask, both under a bf16 autocast; flash-attn itself is replaced by a
    plain-torch kernel with its calling convention."""
    import gpt.model as M
    model = randomised(dataclasses.replace(ALL_FEATURES, num_heads=4, num_kv_heads=2))
    idx = tokens_with_docs()
    idx[1, 0] = 7  # a row that starts inside a document: its first tokens still see nothing before them
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        with autocast:
            dense = model.logits(idx)
        calls = []
        monkeypatch.setattr(M, "varlen_attention_for", lambda device: (calls.append(1), reference_varlen)[1])
        with autocast:
            varlen = model.logits(idx)
            assert M.document_mask(idx, 1, True).varlen is reference_varlen
        assert calls
        # a float32 forward (GPTQ calibration) cannot use flash-attn: the dense/Flex path serves it
        assert M.document_mask(idx, 1, True).varlen is None
    torch.testing.assert_close(varlen.float(), dense.float(), atol=0.05, rtol=0.02)
    mask = M.DocumentMask(idx, 1, True, reference_varlen)
    B, T = idx.shape
    starts = sorted({r * T for r in range(B)} | {r * T + t for r, t in (idx == 1).nonzero().tolist()})
    assert mask.cu_seqlens.tolist() == starts + [idx.numel()]


def test_flash_varlen_lookup_prefers_fa3_then_fa4_then_fa2(monkeypatch):
    """FA4 installs as flash_attn.cute (its SM90 kernels are the Hopper varlen path when FA3 is not built): it is
    found after FA3 and before FA2's flash_attn, and a module without the function is passed over."""
    import sys
    import types
    from gpt.model import find_flash_varlen

    def module(name, has=True):
        m = types.ModuleType(name)
        if has:
            m.flash_attn_varlen_func = lambda *a, **k: name
        return m
    for name in ("flash_attn_interface", "flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "flash_attn", module("flash_attn"))
    assert find_flash_varlen()() == "flash_attn"
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module("flash_attn.cute"))
    assert find_flash_varlen()() == "flash_attn.cute"
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module("flash_attn_interface", has=False))
    assert find_flash_varlen()() == "flash_attn.cute"
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module("flash_attn_interface"))
    assert find_flash_varlen()() == "flash_attn_interface"


def test_the_attention_log_line_imports_no_flash_attn(tmp_path, monkeypatch):
    """train.json's attention line names what is installed without importing it: a flash_attn whose __init__
    raises (a build for another CUDA) must not end a run over a log line, and FA4's flash_attn.cute is seen."""
    import sys
    from gpt.model import ModelConfig
    from gpt.training import attention_backend
    pkg = tmp_path / "flash_attn"
    (pkg / "cute").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('built for another CUDA')\n")
    (pkg / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute", "flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    line = attention_backend(ModelConfig(vocab_size=64, doc_isolation=True), torch.device("cpu"))
    assert "flash-attn installed: flash_attn.cute, flash_attn" in line and "flash_attn" not in sys.modules


class PlainFA4Interface:
    """flash_attn.cute.interface's two private entry points in plain torch, with their calling convention:
    (tokens, heads, D) inputs, lse (heads, tokens) in float32, the backward given (q, k, v, out, dout, lse)."""
    calls: list = []

    @staticmethod
    def _flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, return_lse):
        assert causal and return_lse and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        assert q.dtype == k.dtype == v.dtype and cu_seqlens_q.dtype == torch.int32
        assert not torch.is_grad_enabled() or not q.requires_grad  # an opaque op: autograd stays outside it
        PlainFA4Interface.calls.append("fwd")
        out, lse = PlainFA4Interface.attend(q, k, v, cu_seqlens_q)
        return out, lse, None, None, None

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # a kernel's maths: float32 whatever autocast the caller runs under
    def attend(q, k, v, cu_seqlens):
        outs, lses = [], []
        groups = q.size(1) // k.size(1)
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            qs = q[a:b].float().transpose(0, 1)
            ks, vs = (t[a:b].float().transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
            s = qs @ ks.transpose(1, 2) / q.size(-1) ** 0.5
            s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), float("-inf"))
            lses.append(torch.logsumexp(s, -1))
            outs.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
        return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)

    @staticmethod
    def _flash_attn_bwd(q, k, v, out, dout, lse, causal=False, cu_seqlens_q=None, cu_seqlens_k=None,
                        max_seqlen_q=None, max_seqlen_k=None):
        """Attention's gradient by hand (an op's body runs below autograd), P rebuilt from the forward's lse."""
        return PlainFA4Interface.attend_backward(q, k, v, out, dout, lse, causal, cu_seqlens_q, cu_seqlens_k)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def attend_backward(q, k, v, out, dout, lse, causal, cu_seqlens_q, cu_seqlens_k):
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        assert q.dtype == k.dtype == v.dtype == out.dtype == dout.dtype and lse.dtype == torch.float32
        PlainFA4Interface.calls.append("bwd")
        groups, scale = q.size(1) // k.size(1), q.size(-1) ** -0.5
        dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
        for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            qs, do, os_ = (t[a:b].float().transpose(0, 1) for t in (q, dout, out))
            ks, vs = (t[a:b].float().transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
            s = (qs @ ks.transpose(1, 2) * scale).masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(),
                                                             float("-inf"))
            p = torch.exp(s - lse[:, a:b, None])
            dp = do @ vs.transpose(1, 2)
            ds = p * (dp - (do * os_).sum(-1, keepdim=True)) * scale  # FA4's D = rowsum(dO * O), from the forward's O
            dq[a:b] = (ds @ ks).transpose(0, 1)
            fold = lambda t: t.unflatten(0, (k.size(1), groups)).sum(1).transpose(0, 1)  # noqa: E731
            dk[a:b], dv[a:b] = fold(ds.transpose(1, 2) @ qs), fold(p.transpose(1, 2) @ do)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def test_fa4_is_found_as_opaque_ops_that_compile_without_a_graph_break(monkeypatch):
    """FA4 (flash_attn.cute) is wrapped as torch.library ops: the model's varlen path through them gives the
    dense per-document mask's logits and gradients, and a fullgraph compile traces them (dynamo could not
    trace FA4's own autograd.Function, whose forward JIT-compiles kernels). The kernels are plain torch here."""
    import sys
    import types
    import gpt.model as M
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = lambda *a, **k: "FA4's own function"
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = (PlainFA4Interface._flash_attn_fwd,
                                                            PlainFA4Interface._flash_attn_bwd)
    for name in ("flash_attn_interface", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)
    assert M.find_flash_varlen() is M.fa4_varlen

    cfg = dataclasses.replace(ALL_FEATURES, num_heads=4, num_kv_heads=2)
    idx = tokens_with_docs()
    idx[1, 0] = 7
    results = {}
    for name, varlen in (("dense", None), ("fa4", M.fa4_varlen)):
        torch.manual_seed(0)
        model = randomised(cfg)
        monkeypatch.setattr(M, "varlen_attention_for", lambda device, v=varlen: v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.logits(idx).float().logsumexp(-1).mean()
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert PlainFA4Interface.calls.count("fwd") >= cfg.num_layers and "bwd" in PlainFA4Interface.calls
    torch.testing.assert_close(results["fa4"][0], results["dense"][0], atol=0.02, rtol=0.01)
    assert results["fa4"][1].keys() == results["dense"][1].keys()
    for n, g in results["dense"][1].items():
        torch.testing.assert_close(results["fa4"][1][n].float(), g.float(), atol=0.02, rtol=0.05, msg=n)

    q = torch.randn(12, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(12, 2, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    def attend(q, k, v):
        return M.fa4_varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12,
                            causal=True).float().square().sum()
    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(attend(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # the fake (shape-only) versions against the real ops: shapes, dtypes, strides, autograd registration
    out, lse = (t.detach() for t in M._fa4_forward(q, k, v, cu, 12))  # (the backward op has no gradient itself)
    for op, args in ((M._fa4_forward, (q, k, v, cu, 12)),
                     (M._fa4_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, 12))):
        torch.library.opcheck(op, args)
    with pytest.raises(ValueError, match="only causal"):
        M.fa4_varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12, causal=False)


def test_the_attention_log_line_says_why_an_installed_flash_attn_did_not_serve(tmp_path, monkeypatch):
    """FA4 installed with --target has no `cutlass` on the path (its .pth file is not read from PYTHONPATH):
    the run falls back to FlexAttention, and the log line names the import error instead of leaving a user to
    guess why an installed kernel was not used."""
    import sys
    import gpt.model as M
    from gpt.model import ModelConfig
    from gpt.training import attention_backend
    pkg = tmp_path / "flash_attn" / "cute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import cutlass_missing_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute", "flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(M, "_FLASH_VARLEN", [])
    monkeypatch.setattr(M, "FLASH_VARLEN_ERRORS", {})
    monkeypatch.setattr("gpt.training.FLASH_VARLEN_ERRORS", M.FLASH_VARLEN_ERRORS)
    line = attention_backend(ModelConfig(vocab_size=64, doc_isolation=True), torch.device("cuda"))
    assert line.startswith("flex_attention")
    assert "flash_attn.cute would not import: ModuleNotFoundError: No module named 'cutlass_missing_here'" in line
