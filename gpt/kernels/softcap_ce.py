"""Softcapped cross-entropy in Triton: each row's loss and its gradient with respect to the logits in one kernel.

One program per token row walks the vocabulary in blocks twice: first an online logsumexp of
``cap * tanh(z / cap)`` (fp32, whatever the logits' dtype), then ``(softmax - onehot) * (1 - tanh^2)`` written
out in the logits' dtype, into the logits' own buffer when the caller owns it. So the (tokens x vocab) logits
exist once, in bf16 on the GPU, and are never copied to fp32, softcapped, or kept for backward: backward
only scales the gradient made here. Rows whose target is ``ignore_index`` add no loss and get a zero gradient.

``fused_softcap_cross_entropy`` is the train stage's ``loss_fn``: the tied head projected chunk by chunk with
cuBLAS, each chunk's logits turned into their gradient by the kernel and folded into the gradients of the
hidden states and the embedding at once (the plan of gpt/losses.py, its torch reference, with the fp32
elementwise chain replaced by the kernel). ``softcap_cross_entropy`` takes logits (tests, benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100  # F.cross_entropy's default: golf never masks a target today, but a masked row must cost nothing


@triton.jit
def _tanh(x):
    # from exp(-2|x|): never overflows (no inf / inf), and tl has no tanh the interpreter also runs
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(row_ptr, cols, mask, cap, HAS_CAP: tl.constexpr):
    """(z, 1 - tanh^2) of one block in fp32; z = -inf outside the vocabulary so it drops out of the softmax."""
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_CAP:
        t = _tanh(x / cap)
        z = cap * t
        dz = 1.0 - t * t
    else:
        z = x
        dz = tl.full(x.shape, 1.0, tl.float32)
    return tl.where(mask, z, float("-inf")), dz


@triton.jit
def _softcap_ce_kernel(logits_ptr, stride_l, targets_ptr, loss_ptr, grad_ptr, stride_g, cap, ignore_index,
                       V: tl.constexpr, HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # V a constexpr: one compile per vocabulary (fixed in a run), and loop bounds numpy 2's interpreter accepts
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * stride_l
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    offs = tl.arange(0, BLOCK_V)
    # pass 1: online logsumexp, one max and one sum per block (one exp per logit)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z, _ = _capped(src, cols, cols < V, cap, HAS_CAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_t = tl.where(valid, target, 0)  # an ignored row's -100 must not be read
    zt = tl.load(src + safe_t).to(tl.float32)
    if HAS_CAP:
        zt = cap * _tanh(zt / cap)
    loss = lse - zt
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        # pass 2: d loss / d logits; the row (16 KB in bf16 at vocab 8192) is still in L2 from pass 1
        dst = grad_ptr + row * stride_g
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z, dz = _capped(src, cols, mask, cap, HAS_CAP)
            g = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * dz * keep
            tl.store(dst + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(V: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    # a 2048-wide block (8 KB of fp32 per live tensor) keeps registers in bounds at any vocabulary
    block = block_v or min(triton.next_power_of_2(V), 2048)
    return block, num_warps or (8 if block >= 2048 else 4)


def softcap_ce_rows(logits: Tensor, targets: Tensor, softcap: float, ignore_index: int = IGNORE_INDEX,
                    grad: Tensor | None = None, block_v: int | None = None, num_warps: int | None = None) -> Tensor:
    """Per-row losses (N,) fp32 of softcap(logits) (N, V) against targets (N,); when ``grad`` is given (the
    logits' shape; may be ``logits`` itself: each element is read before it is overwritten, by the same program)
    d(row loss)/d(logits) is written into it."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be (N, V) with contiguous rows"
    N, V = logits.shape
    assert targets.shape == (N,), (targets.shape, N)
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return losses
    if grad is not None:
        assert grad.shape == logits.shape and grad.stride(1) == 1
    block, warps = _launch_config(V, block_v, num_warps)
    out = grad if grad is not None else logits  # an unused pointer when WRITE_GRAD is off
    _softcap_ce_kernel[(N,)](logits, logits.stride(0), targets.contiguous(), losses, out, out.stride(0),
                             float(softcap) if softcap > 0 else 1.0, ignore_index, V=V,
                             HAS_CAP=softcap > 0, WRITE_GRAD=grad is not None, BLOCK_V=block, num_warps=warps)
    return losses


# --- on logits ---------------------------------------------------------------------------------------------
class SoftcapCrossEntropy(torch.autograd.Function):
    """Loss and gradient from one kernel in forward; backward scales the stored gradient (logits' dtype)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, softcap: float, ignore_index: int, reduction: str) -> Tensor:
        grad = torch.empty_like(logits)
        losses = softcap_ce_rows(logits, targets, softcap, ignore_index, grad)
        count = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        ctx.save_for_backward(grad, count)
        ctx.reduction = reduction
        if reduction == "none":
            return losses
        return losses.sum() / count if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad, count = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_out[:, None]
        else:
            scale = grad_out / count if ctx.reduction == "mean" else grad_out
        return grad * scale.to(grad.dtype), None, None, None, None


def softcap_cross_entropy(logits: Tensor, targets: Tensor, softcap: float, ignore_index: int = IGNORE_INDEX,
                          reduction: str = "mean") -> Tensor:
    """F.cross_entropy(softcap(logits)) through the kernel; logits (N, V) any float dtype, targets (N,).
    An all-ignored batch's mean is 0 (F.cross_entropy gives nan)."""
    assert reduction in ("mean", "sum", "none"), reduction
    return SoftcapCrossEntropy.apply(logits, targets, softcap, ignore_index, reduction)


def softcap_cross_entropy_torch(logits: Tensor, targets: Tensor, softcap: float, ignore_index: int = IGNORE_INDEX,
                                reduction: str = "mean") -> Tensor:
    """The plain-torch reference: fp32 logits, softcapped, then F.cross_entropy (GPT.project + GPT.forward)."""
    z = logits.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, ignore_index=ignore_index, reduction=reduction)


# --- on hidden states: the projection chunked around the kernel ---------------------------------------------
@torch.library.custom_op("golf::softcap_ce_hidden", mutates_args=())
def _softcap_ce_hidden(h: Tensor, weight: Tensor, targets: Tensor, softcap: float, ignore_index: int,
                       chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean loss, grad_h, grad_w fp32, count): the gradients of the summed loss, unscaled.

    A custom op, so torch.compile keeps it whole (an opaque call in the graph, no break) instead of
    tracing the kernel launches and the chunk loop."""
    w = weight.to(h.dtype)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        hc = h[s:s + chunk]
        logits = hc @ w.T  # h's dtype (bf16 in training): the chunk's one (tokens x vocab) buffer
        total += softcap_ce_rows(logits, targets[s:s + chunk], softcap, ignore_index, grad=logits).sum()
        torch.mm(logits, w, out=grad_h[s:s + chunk])  # logits now hold d loss / d logits
        grad_w += (logits.T @ hc).float()
    count = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    return total / count, grad_h, grad_w, count


@_softcap_ce_hidden.register_fake
def _(h, weight, targets, softcap, ignore_index, chunk):
    scalar = h.new_empty((), dtype=torch.float32)
    return scalar, torch.empty_like(h), h.new_empty(weight.shape, dtype=torch.float32), scalar.clone()


class FusedSoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, softcap: float, ignore_index: int,
                chunk: int) -> Tensor:
        loss, grad_h, grad_w, count = torch.ops.golf.softcap_ce_hidden(h, weight, targets, softcap,
                                                                       ignore_index, chunk)
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None


def fused_softcap_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, softcap: float, chunk: int = 8192,
                                ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy of softcap(h @ weight^T) against targets, h (N, d), targets (N,): the train stage's
    loss_fn (gpt/losses.py's signature and maths; rows with target ``ignore_index`` left out of the mean)."""
    return FusedSoftcapCrossEntropy.apply(h, weight, targets, softcap, ignore_index, chunk)
