"""Optimizers of the records: Muon for matrices, Adam for embeddings and scalars.

Muon keeps a momentum buffer per matrix, orthogonalises the (Nesterov) update with a Newton-Schulz
iteration, and scales it so every matrix moves by about the same RMS regardless of its shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Quintic Newton-Schulz coefficients tuned for fast convergence of singular values towards 1.
NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a 2-D matrix (U S V^T -> U V^T, loosely), in bfloat16 on GPU."""
    assert g.ndim == 2, g.shape
    a, b, c = NS5_COEFFS
    x = g.to(torch.bfloat16) if g.is_cuda else g.float()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return (x.T if transposed else x).to(g.dtype)


_compiled_ns = None


def orthogonalise(g: Tensor, steps: int) -> Tensor:
    """newton_schulz, compiled on GPU (fuses the small elementwise ops between its matmuls)."""
    global _compiled_ns
    if not g.is_cuda:
        return newton_schulz(g, steps)
    if _compiled_ns is None:
        _compiled_ns = torch.compile(newton_schulz)
    return _compiled_ns(g, steps)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                update = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_steps"])
                update *= max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
