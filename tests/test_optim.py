"""Muon sharded over torch.distributed ranks (gloo, 2 processes) against Muon in one process."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.optim import Muon

SHAPES = [(48, 16), (16, 48), (32, 32), (64, 16), (8, 8)]


def make_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def run_steps(opt: Muon, params, steps: int = 3) -> None:
    for s in range(steps):
        set_grads(params, s)
        opt.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = make_params()
        opt = Muon(params, lr=0.02, schedule="polar_express", weight_decay=0.1)
        run_steps(opt, params)
        full = opt.full_state_dict()
        owned = sorted(i for i, p in enumerate(params) if p in opt.state)
        torch.save({"params": [p.detach() for p in params], "full": full, "owned": owned}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_muon_gives_the_single_process_result(tmp_path):
    params = make_params()
    ref = Muon(params, lr=0.02, schedule="polar_express", weight_decay=0.1)
    run_steps(ref, params)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # each rank did the work for its own matrices only, and together they did all of it
    owned = [set(r["owned"]) for r in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(range(len(SHAPES)))
    for r in ranks:  # every rank ends with every matrix as one process computes it
        for p, q in zip(r["params"], params):
            torch.testing.assert_close(p, q.detach(), rtol=0, atol=0)
    # the gathered state holds every momentum buffer, loadable into a single-process optimizer
    full = ranks[0]["full"]
    assert sorted(full["state"]) == list(range(len(SHAPES)))
    fresh = Muon(make_params(), lr=0.02, schedule="polar_express", weight_decay=0.1)
    fresh.load_state_dict(full)
    for i, p in enumerate(params):
        torch.testing.assert_close(fresh.state[fresh.param_groups[0]["params"][i]]["momentum_buffer"],
                                   ref.state[p]["momentum_buffer"], rtol=0, atol=0)


def test_the_deal_balances_matrix_sizes_over_ranks():
    opt = Muon(make_params())
    params = opt.param_groups[0]["params"]
    owner = opt.owners(params, 2)
    load = [sum(p.numel() for p, o in zip(params, owner) if o == r) for r in range(2)]
    assert owner == opt.owners(params, 2)  # deterministic
    assert abs(load[0] - load[1]) <= max(p.numel() for p in params)
    assert opt.owners(params, 1) == [0] * len(params)
