"""Optimizers of the records: Muon for matrices, Adam for embeddings and scalars.

Muon keeps a momentum buffer per matrix, orthogonalises the (Nesterov) update with a Newton-Schulz
iteration, and scales it so every matrix moves by about the same RMS regardless of its shape.

Under torch.distributed the matrices are dealt out to the ranks (balanced by size): each rank keeps the
momentum of, orthogonalises and updates only its own share, then broadcasts those matrices to the
others. Replicated, the Newton-Schulz work is a fixed cost per GPU that does not shrink with more GPUs
(~27 ms of a 304 ms baseline step on one H100: a tenth of the step on 2 GPUs, a fifth on 8); sharded, it
divides like the rest of the step. The result is the same as on one process: every rank starts from the
same all-reduced gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic Newton-Schulz coefficients tuned for fast convergence of singular values towards 1 (the
# official baseline), the same at every iteration.
NS5_COEFFS = ((3.4445, -4.7750, 2.0315),)
# Polar Express (Amsel et al., 2025): a different optimal quintic per iteration, for 5 iterations.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SCHEDULES = {"ns5": NS5_COEFFS, "polar_express": POLAR_EXPRESS_COEFFS}


def newton_schulz(g: Tensor, steps: int = 5, schedule: str = "ns5", eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a 2-D matrix (U S V^T -> U V^T, loosely), in bfloat16 on GPU.

    Each iteration applies x <- a x + (b A + c A^2) x with A = x x^T; ``schedule`` gives (a, b, c) per
    iteration (the last triple repeats when there are more iterations than triples).
    """
    assert g.ndim == 2, g.shape
    coeffs = SCHEDULES[schedule]
    x = g.to(torch.bfloat16) if g.is_cuda else g.float()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    # the Frobenius norm bounds the largest singular value, so every one starts <= 1, as both schedules assume
    # (the records divide by it alone: an extra margin would start Polar Express off its tuned range)
    x = x / (x.norm() + eps)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return (x.T if transposed else x).to(g.dtype)


_compiled_ns = None


def orthogonalise(g: Tensor, steps: int, schedule: str) -> Tensor:
    """newton_schulz, compiled on GPU (fuses the small elementwise ops between its matmuls)."""
    global _compiled_ns
    if not g.is_cuda:
        return newton_schulz(g, steps, schedule)
    if _compiled_ns is None:
        _compiled_ns = torch.compile(newton_schulz)
    return _compiled_ns(g, steps, schedule)


class Muon(torch.optim.Optimizer):
    """Muon. ``row_norm`` (MuonEq-R, as we read it) equalises the rows of the momentum update to unit norm
    before orthogonalising, so no output channel dominates the polar factor; ``weight_decay`` is decoupled
    (p <- p * (1 - lr * wd)).

    ``shard``: split the work over the torch.distributed ranks (see the module docstring). Only for ranks that
    hold the same gradients (after DDP's all-reduce): each matrix ends up as its owner computed it."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, schedule: str = "ns5", row_norm: bool = False, weight_decay: float = 0.0,
                 shard: bool = False):
        if schedule not in SCHEDULES:
            raise ValueError(f"Muon schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      schedule=schedule, row_norm=row_norm, weight_decay=weight_decay))
        self.shard = shard
        self._owners: dict = {}  # (parameter ids, world) -> owner of each

    def _world(self) -> tuple[int, int]:
        if self.shard and dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def owners(self, params: list[Tensor], world: int) -> list[int]:
        """The rank that updates each matrix: largest first, each to the least-loaded rank (deterministic,
        so every rank computes the same deal; dealt once per parameter list and world size)."""
        key = (tuple(id(p) for p in params), world)
        if key not in self._owners:
            self._owners[key] = self._deal(params, world)
        return self._owners[key]

    @staticmethod
    def _deal(params: list[Tensor], world: int) -> list[int]:
        load, owner = [0] * world, [0] * len(params)
        for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
            r = min(range(world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += params[i].numel()
        return owner

    @torch.no_grad()
    def step(self):
        world, rank = self._world()
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for p, owner in zip(params, self.owners(params, world)):
                if p.grad is None:
                    continue
                if owner == rank:
                    self._update(p, group)
                if world > 1:  # the owner sends its result; the NCCL copy overlaps the next matrix's work
                    pending.append(dist.broadcast(p.data, src=owner, async_op=True))
        for work in pending:
            work.wait()

    def _update(self, p: Tensor, group: dict) -> None:
        g = p.grad
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(g)
        update = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if group["row_norm"]:
            # each row to unit L2 norm, floored at 1e-7 as the record does (the scale itself Newton-Schulz removes).
            # A floor added to the rows' RMS instead sits sqrt(cols) times higher: early on, behind the
            # zero-initialised projections, whole matrices have rows that small, and it held them down instead
            # of equalising them (the CPU cross-check's step-2 difference from the record script, all of it)
            update = update / update.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(update.dtype)
        update = orthogonalise(update, group["ns_steps"], group["schedule"])
        update *= max(1.0, p.size(0) / p.size(1)) ** 0.5
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    def full_state_dict(self) -> dict | None:
        """Every matrix's state, each from the rank that owns it, gathered on rank 0 (a collective: call it on
        every rank; the others get None). Only owners' buffers are current: a rank that loaded a full state
        on resume still holds copies of the others', stale after the first step."""
        sd = self.state_dict()
        world, rank = self._world()
        if world == 1:
            return sd
        owner = [o for g in self.param_groups for o in self.owners(g["params"], world)]  # state_dict's order
        # copies (.cpu() of a CPU tensor is the tensor itself): the live buffers change with the next step
        mine = {k: {n: t.detach().to("cpu", copy=True) if torch.is_tensor(t) else t for n, t in v.items()}
                for k, v in sd["state"].items() if owner[k] == rank}
        shards = [None] * world if rank == 0 else None
        dist.gather_object(mine, shards, dst=0)
        if rank != 0:
            return None
        merged = {}
        for shard in shards:
            merged.update(shard)
        return {"state": dict(sorted(merged.items())), "param_groups": sd["param_groups"]}
