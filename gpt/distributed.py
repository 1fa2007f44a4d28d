"""The one distributed start-up: which rank this process is, the process group, the CPU threads per process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        """Leave the process group (every rank calls it once, at the end or on a stop)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def average_grads(params: list[torch.Tensor], world: int) -> None:
    """Every rank's gradients replaced by their mean over the ranks: one all-reduce per dtype, over a flat copy."""
    by_dtype: dict = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def start_distributed(device: torch.device) -> Ranks:
    """Join torchrun's process group (NCCL on GPUs, gloo on the CPU) when WORLD_SIZE > 1; on the CPU, share the
    cores between the processes of this machine."""
    ranks = Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    if ranks.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    return ranks
