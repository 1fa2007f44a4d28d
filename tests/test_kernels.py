"""gpt/kernels' Triton kernels against their plain-torch references, run by Triton's interpreter on the CPU.

TRITON_INTERPRET must be set when triton is first imported (tl.max, tl.sum and the rest are jit functions of
triton's own, decorated then) and while a kernel runs (the interpreter imports parts of triton lazily). So this
module sets it around importing the kernels and, by an autouse fixture, during each of its tests; no other test
sees it. In a test run where something imported triton before this module (torch.compile does, in other test
modules), the tests here are skipped in-process and ``test_in_a_fresh_process`` runs this file again in a
process of its own, failing with that run's output if any test fails there.
The shapes are small (the interpreter runs each program in numpy) but odd: vocabularies that no block divides,
row counts no chunk divides, masked rows. The real shapes are bench/kernels_bench.py's, on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

FRESH = "triton" not in sys.modules
CE = LR = None
if FRESH:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        from gpt.kernels import leaky_relu2 as LR
        from gpt.kernels import softcap_ce as CE
    finally:
        if _before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _before
else:
    pytest.importorskip("triton")

from gpt.kernels import use_triton  # noqa: E402
from gpt.losses import fused_softcap_cross_entropy as torch_fused_ce  # noqa: E402
from gpt.model import GPT, ModelConfig  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def interpreted(request, monkeypatch):
    if request.node.name == "test_in_a_fresh_process":
        return
    if not FRESH:
        pytest.skip("triton was imported before this module: run by test_in_a_fresh_process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_in_a_fresh_process():
    if FRESH:
        pytest.skip("this process imported triton under the interpreter: the tests ran here")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "run by test_in_a_fresh_process" not in proc.stdout, proc.stdout[-3000:]  # they ran there, not skipped


def test_the_kernels_run_interpreted():
    """Were triton or the kernel modules imported earlier in this process without the interpreter, the kernels
    would not run on the CPU: run this file in its own process then (``pytest tests/test_kernels.py``)."""
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(std.max, InterpretedFunction), "triton was imported before TRITON_INTERPRET was set"
    assert isinstance(CE._softcap_ce_kernel, InterpretedFunction)
    assert isinstance(LR._leaky_relu2_fwd_kernel, InterpretedFunction)


def logits_and_targets(n: int, v: int, dtype, ignored=(3, 10), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # scale 20: many logits far into the softcap's flat part, where tanh' is small
    x = (torch.randn(n, v, generator=g) * 20).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = CE.IGNORE_INDEX
    return x, t


# Triton's interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest): one bf16 ulp, 2^-7 relative
BF16_CAST = 2 ** -7


def grad_tol(dtype):
    # bf16: the kernel's stored gradient (one interpreter cast), then the scale (upstream / count, one factor for
    # every element) and the product, each rounded by torch (2^-8); the reference's gradient stays fp32.
    # test_ce_rows_gradient_is_rounded_once checks the kernel's own output to one cast
    return dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=BF16_CAST + 2 * 2 ** -8, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [30.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_on_logits_matches_torch(dtype, softcap, reduction):
    """37 rows, vocab 301 in blocks of 128 (the last one 45 wide): loss and gradient of the fp32 reference."""
    x, t = logits_and_targets(37, 301, dtype)
    upstream = torch.rand(37) + 0.5 if reduction == "none" else torch.tensor(3.0)
    ref_x = x.detach().float().clone().requires_grad_()
    ref = CE.softcap_cross_entropy_torch(ref_x, t, softcap, reduction=reduction)
    (ref * upstream).sum().backward()
    got_x = x.detach().clone().requires_grad_()
    block = CE._launch_config
    try:  # a 128-wide block forces several blocks per row and a ragged last one
        CE._launch_config = lambda V, b, w: block(V, 128, w)
        got = CE.softcap_cross_entropy(got_x, t, softcap, reduction=reduction)
    finally:
        CE._launch_config = block
    (got * upstream).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-5)
    assert got_x.grad.dtype == dtype
    torch.testing.assert_close(got_x.grad.float(), ref_x.grad, **grad_tol(dtype))
    assert torch.all(got_x.grad[[3, 10]] == 0)


def test_ce_rows_in_place_and_ignored_rows():
    x, t = logits_and_targets(9, 77, torch.bfloat16, ignored=(0, 8))
    separate = torch.empty_like(x)
    losses = CE.softcap_ce_rows(x, t, 30.0, grad=separate)
    ref = CE.softcap_cross_entropy_torch(x, t, 30.0, reduction="none")
    torch.testing.assert_close(losses, ref, rtol=1e-6, atol=1e-5)
    assert losses[0] == 0 and losses[8] == 0
    in_place = x.clone()
    torch.testing.assert_close(CE.softcap_ce_rows(in_place, t, 30.0, grad=in_place), losses, rtol=0, atol=0)
    assert torch.equal(in_place, separate)  # each element read before the same program overwrote it
    # without a gradient buffer the logits are left alone
    before = x.clone()
    CE.softcap_ce_rows(x, t, 30.0)
    assert torch.equal(x, before)


def test_ce_rows_gradient_is_rounded_once():
    """The kernel's gradient in bf16 is the fp32 gradient cast once to bf16."""
    x, t = logits_and_targets(11, 333, torch.bfloat16, ignored=(4,))
    grad = torch.empty_like(x)
    CE.softcap_ce_rows(x, t, 30.0, grad=grad)
    ref_x = x.detach().float().requires_grad_()
    CE.softcap_cross_entropy_torch(ref_x, t, 30.0, reduction="sum").backward()
    torch.testing.assert_close(grad.float(), ref_x.grad, rtol=BF16_CAST, atol=1e-7)


def test_ce_all_ignored_is_zero_not_nan():
    x, t = logits_and_targets(4, 50, torch.float32, ignored=(0, 1, 2, 3))
    x.requires_grad_()
    loss = CE.softcap_cross_entropy(x, t, 30.0)
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0)


def test_ce_rows_on_strided_logits():
    """A view with a row stride wider than the vocabulary (a slice of a larger buffer)."""
    x, t = logits_and_targets(6, 130, torch.float32, ignored=())
    wide = torch.zeros(6, 200)
    wide[:, :130] = x
    torch.testing.assert_close(CE.softcap_ce_rows(wide[:, :130], t, 30.0),
                               CE.softcap_cross_entropy_torch(x, t, 30.0, reduction="none"), rtol=1e-6, atol=1e-5)


def hidden_case(n: int, d: int, v: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 2).to(dtype)
    w = torch.randn(v, d, generator=g) * 0.5  # fp32, as the tied embedding is
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


def hidden_grads(fn, h, w, t, softcap, upstream=3.0):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t, softcap)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [30.0, 0.0])
def test_fused_ce_on_hidden_matches_the_torch_fused_loss(dtype, softcap):
    """53 rows in chunks of 16 (the last one 5), vocab 301: gpt/losses.py's path, the same dtypes throughout."""
    h, w, t = hidden_case(53, 24, 301, dtype)
    ref = hidden_grads(lambda *a: torch_fused_ce(*a, chunk=16), h, w, t, softcap)
    got = hidden_grads(lambda *a: CE.fused_softcap_cross_entropy(*a, chunk=16), h, w, t, softcap)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    assert got[1].dtype == dtype and got[2].dtype == torch.float32
    torch.testing.assert_close(got[1].float(), ref[1].float(), **tol)
    torch.testing.assert_close(got[2], ref[2], **tol)


def test_fused_ce_on_hidden_leaves_ignored_rows_out():
    """Against plain autograd through F.cross_entropy(ignore_index): the mean is over the kept rows only."""
    h, w, t = hidden_case(29, 16, 101, torch.float32)
    t[[0, 7, 28]] = CE.IGNORE_INDEX

    def plain(h, w, t, cap):
        return F.cross_entropy(cap * torch.tanh((h @ w.T) / cap), t, ignore_index=CE.IGNORE_INDEX)
    ref = hidden_grads(plain, h, w, t, 30.0)
    got = hidden_grads(lambda *a: CE.fused_softcap_cross_entropy(*a, chunk=8), h, w, t, 30.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.all(got[1][[0, 7, 28]] == 0)


def test_fused_ce_traces_under_torch_compile():
    """The custom op's fake shapes and the autograd.Function hold under dynamo + AOT autograd (no inductor:
    its CPU code generation is minutes on the test machines, and adds nothing the op does not already do)."""
    h, w, t = hidden_case(21, 16, 67, torch.float32)
    fn = torch.compile(lambda h, w, t: CE.fused_softcap_cross_entropy(h, w, t, 30.0, chunk=8),
                       backend="aot_eager", fullgraph=True)
    got = hidden_grads(lambda h, w, t, cap: fn(h, w, t), h, w, t, 30.0)
    ref = hidden_grads(lambda *a: CE.fused_softcap_cross_entropy(*a, chunk=8), h, w, t, 30.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- LeakyReLU(0.5)^2 ---------------------------------------------------------------------------------------
def activations(shape, dtype, seed: int = 0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    special = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 40.0])  # the kink and a large value
    x.view(-1)[:5] = special[:x.numel()]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 129), (1,), (2048 * 2 + 1,)])
def test_leaky_relu2_matches_torch(dtype, shape):
    """Sizes no block divides (2709, one element, one past two blocks): value and gradient of the fp32 maths."""
    h = activations(shape, dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_h = h.detach().float().clone().requires_grad_()
    LR.leaky_relu2_torch(ref_h).backward(g.float())
    got_h = h.detach().clone().requires_grad_()
    out = LR.leaky_relu2(got_h)
    out.backward(g)
    assert out.dtype == dtype and got_h.grad.dtype == dtype
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=BF16_CAST, atol=0)
    torch.testing.assert_close(out.float(), LR.leaky_relu2_torch(h.float()), **tol)
    torch.testing.assert_close(got_h.grad.float(), ref_h.grad, **tol)


def test_leaky_relu2_on_a_non_contiguous_input():
    h = activations((8, 33), torch.float32).T  # a transposed view
    h.requires_grad_()
    out = LR.leaky_relu2(h)
    out.sum().backward()
    torch.testing.assert_close(out, LR.leaky_relu2_torch(h.detach()), rtol=0, atol=0)
    torch.testing.assert_close(h.grad, torch.where(h > 0, 2 * h, 0.5 * h).detach(), rtol=0, atol=0)


def test_leaky_relu2_traces_under_torch_compile():
    h = activations((5, 40), torch.float32).requires_grad_()
    fn = torch.compile(lambda x: LR.leaky_relu2(x) * 2, backend="aot_eager", fullgraph=True)
    fn(h).sum().backward()
    torch.testing.assert_close(h.grad, 2 * torch.where(h > 0, 2 * h, 0.5 * h).detach(), rtol=0, atol=0)


# --- in the model, as the train stage plugs them in ------------------------------------------------------
MODEL = ModelConfig(vocab_size=97, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
                    mlp_activation="leaky_relu2", logit_softcap=30.0)


def model_grads(cfg, kernels: dict | None, compiled: bool = False):
    from gpt.training import TrainConfig, attach_kernels
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would leave the MLP out of the gradient
            p.add_(torch.randn_like(p) * 0.1)
    ran = attach_kernels(model, TrainConfig(model=cfg, **(kernels or {})), torch.device("cpu"))
    idx = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    fwd = torch.compile(model, backend="aot_eager") if compiled else model  # the trainer compiles the model whole
    loss = fwd(idx[:, :-1], idx[:, 1:])
    (loss * 2.0).backward()
    return ran, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_the_model_with_both_kernels_matches_the_plain_model():
    plain_ran, plain_loss, plain = model_grads(MODEL, None)
    ran, loss, grads = model_grads(MODEL, {"ce_kernel": "triton", "mlp_kernel": "triton"})
    assert plain_ran == {"ce": "torch", "mlp": "torch"} and ran == {"ce": "triton", "mlp": "triton"}
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for n, g in plain.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_the_compiled_model_calls_the_kernels_as_the_eager_one_does():
    _, eager_loss, eager = model_grads(MODEL, {"ce_kernel": "triton", "mlp_kernel": "triton"})
    _, loss, grads = model_grads(MODEL, {"ce_kernel": "triton", "mlp_kernel": "triton"}, compiled=True)
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    for n, g in eager.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_kernel_choice_rules(monkeypatch):
    import gpt.kernels as K
    from gpt.training import TrainConfig, attach_kernels
    cpu = torch.device("cpu")
    assert not use_triton("auto", cpu) and not use_triton("torch", torch.device("cuda"))
    assert use_triton("triton", cpu)
    relu2 = GPT(dataclasses.replace(MODEL, mlp_activation="relu2"))
    assert attach_kernels(relu2, TrainConfig(model=relu2.cfg, mlp_kernel="triton"), cpu)["mlp"] == "none"
    # fused_loss=on with the default kernel: gpt/losses.py's torch path
    on = GPT(MODEL)
    assert attach_kernels(on, TrainConfig(model=MODEL, fused_loss="on"), cpu)["ce"] == "torch-fused"
    with pytest.raises(ValueError, match="fused_loss=off"):
        TrainConfig(model=MODEL, ce_kernel="triton", fused_loss="off")
    with pytest.raises(ValueError, match="ce_kernel"):
        TrainConfig(model=MODEL, ce_kernel="cuda")
    monkeypatch.setattr(K, "triton_importable", lambda: False)
    assert not use_triton("auto", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="cannot be imported"):
        use_triton("triton", cpu)
