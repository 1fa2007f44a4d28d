"""LeakyReLU(0.5)^2 of the MLP's up projection in Triton: forward and backward, one elementwise pass each.

Forward reads the GEMM's output h once and writes leaky(h)^2; backward reads h and the incoming gradient and
writes ``grad * d/dh``, where d/dh = 2h for h > 0 and 0.5h below (d/dh of (0.5h)^2). Only h is kept for
backward (the activation is not), and the maths runs in fp32 whatever the dtype. Both are custom ops, so a
compiled model calls them as they are. ``leaky_relu2_torch`` is the model's own expression (gpt/model.py's MLP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048  # elements per program: 4 KB of bf16 in, 4 KB out; enough work per launch, few registers


@triton.jit
def _leaky_relu2_fwd_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.where(h > 0, h, 0.5 * h)
    tl.store(out_ptr + offs, (a * a).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _leaky_relu2_bwd_kernel(h_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(h > 0, 2.0 * h, 0.5 * h)
    tl.store(out_ptr + offs, (g * d).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("golf::leaky_relu2", mutates_args=())
def leaky_relu2_forward(h: Tensor) -> Tensor:
    h = h.contiguous()
    out = torch.empty_like(h)
    n = h.numel()
    if n:
        _leaky_relu2_fwd_kernel[(triton.cdiv(n, BLOCK),)](h, out, n, BLOCK=BLOCK, num_warps=4)
    return out


@leaky_relu2_forward.register_fake
def _(h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("golf::leaky_relu2_backward", mutates_args=())
def leaky_relu2_backward(h: Tensor, grad: Tensor) -> Tensor:
    h, grad = h.contiguous(), grad.contiguous()
    out = torch.empty_like(h)
    n = h.numel()
    if n:
        _leaky_relu2_bwd_kernel[(triton.cdiv(n, BLOCK),)](h, grad, out, n, BLOCK=BLOCK, num_warps=4)
    return out


@leaky_relu2_backward.register_fake
def _(h, grad):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


class LeakyReLU2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return torch.ops.golf.leaky_relu2(h)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h,) = ctx.saved_tensors
        return torch.ops.golf.leaky_relu2_backward(h, grad.to(h.dtype))


def leaky_relu2(h: Tensor) -> Tensor:
    """leaky_relu(h, 0.5)^2 through the kernels; the MLP's ``act_fn`` when the train stage picks triton."""
    return LeakyReLU2.apply(h)


def leaky_relu2_torch(h: Tensor) -> Tensor:
    """The plain-torch reference: the MLP's expression (inductor fuses it when the model is compiled)."""
    return F.leaky_relu(h, 0.5).square()
