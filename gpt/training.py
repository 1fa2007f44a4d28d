"""The training loop: a GPT trained on token shards under a wallclock cap, on one process or under torchrun.

``Trainer`` reads top to bottom as the run goes: ``set_up`` (model, optimizers, compile), ``warm_up`` (compile
steps, then the initial state restored: not timed, as the records do), ``resume`` (a snapshot of an earlier
segment, clock included), then ``run``: ``step`` after step, checkpoints in warmdown for SWA, periodic
``snapshot``s, until the time or step limit or a stop signal (``stop``: every rank saves where it is). Every
decision that must agree across ranks (stop, warmdown, recurrence, snapshot) is taken from one all-reduce per
step (``agree``). ``finish`` writes the weights and the run's figures.

Part of the core: it ships in train_gpt.py, so it imports torch, numpy and the core only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checks
from .devices import resolve_device
from .diskio import TORCH_WRITE_FAILED, disk_refusal
from .distributed import Ranks, average_grads, start_distributed
from .kernels import KERNEL_CHOICES, use_triton
from .losses import fused_softcap_cross_entropy
from .model import (FLASH_VARLEN_ERRORS, FLASH_VARLEN_MODULES, GPT, Linear, ModelConfig, flops_per_token,
                    varlen_attention_for)
from .optim import Muon
from .progress import progress_bar
from .shards import load_tokens

log = logging.getLogger("golf.train")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 1337
    max_seconds: float = 600.0     # wallclock cap of the training loop (the challenge: 600 s on 8x H100)
    max_steps: int = 0             # also stop after this many steps (0 = only the wallclock cap)
    seq_len: int = 1024
    batch_tokens: int = 524_288    # global tokens per optimizer step, whatever the number of processes
    micro_batch_tokens: int = 65_536  # tokens per process per forward pass; sets gradient accumulation
    matrix_lr: float = 0.04        # Muon, for the 2-D weights of the blocks
    embed_lr: float = 0.05         # Adam, tied embedding
    scalar_lr: float = 0.04        # Adam, gains, scales, mixes, skip weights and gates, lane lambdas, attention gates
    adam_beta2: float = 0.95       # Adam's second-moment decay for the embedding and scalars (records: 0.99)
    embed_weight_decay: float = 0.0   # decoupled (AdamW) weight decay of the tied embedding (records: 0.085)
    scalar_weight_decay: float = 0.0  # decoupled (AdamW) weight decay of the scalars (records: 0.02)
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_weight_decay: float = 0.0  # decoupled weight decay on the matrices (records: 0.095)
    muon_schedule: str = "ns5"     # ns5 (baseline) | polar_express (records)
    muon_row_norm: bool = False    # MuonEq-R: rows of the update equalised before orthogonalising
    recur_from_frac: float = 0.0   # switch the model's recurrence span on at this fraction of training
    warmup_steps: int = 0          # linear LR warmup
    warmdown_frac: float = 0.25    # final fraction of the budget (time or steps) with LR decaying linearly
    # under the wallclock cap the steps left are estimated from the mean step time so far (the official baseline's
    # WARMDOWN_ITERS does the same)
    warmdown_steps: int = 0        # warmdown over the last N steps, replacing warmdown_frac when > 0 (PR #281: 3000)
    min_lr_frac: float = 0.0       # LR floor during warmdown, as a fraction of the peak
    grad_clip: float = 0.0         # global grad-norm clip (0 = off)
    # global: the norm of the gradient averaged over the processes. local (the records on 8 GPUs): each process
    # clips its own gradient before the average, so a noisier per-GPU gradient is clipped harder; one process: the same
    clip_scope: str = "global"
    ema_decay: float = 0.0         # EMA of the weights (0 = off; records: 0.9965)
    swa_every: int = 50            # save a checkpoint every N steps during warmdown (0 = none)
    compile_warmup_steps: int = 20  # steps run before the clock starts to compile and warm up, then undone
    # (a model with a recurrence runs them once per graph: without it, then with it)
    # the record's warm-up restores the weights and Adam but not Muon's momentum (its sharded Muon keeps the buffers
    # outside the optimizer state), so its training starts with momentum built by the warm-up steps; measured on
    # one H200 this is worth 0.13-0.2 nats of train loss from step 20 to 200 (BENCHMARKS.md "Record parity").
    # True does the same here, and runs the warm-up even without compile, since it now changes the result
    warmup_primes_muon: bool = False
    # how batches are cut from the shards. stream (the official baseline's): each micro-batch one contiguous span
    # of world x (micro_batch_tokens + 1), a slice per process, none read twice, running on across shards (so
    # micro_batch_tokens decides which tokens are trained on, as in the official). shard_spans (the records'): every micro-batch its own
    # span from the shard's first BOS on, a span that does not fit skips the shard's tail, after the last shard
    # shard 0 again, so every pass over the data cuts the same rows
    loader: str = "stream"
    nproc: int = 1                 # processes (GPUs); >1 launches torchrun
    device: str = "auto"           # auto | cpu | cuda
    compile: str = "auto"          # auto (on for cuda) | on | off
    fused_loss: str = "auto"       # fuse projection + softcap + cross-entropy: auto (cuda and vocab >= 4096) | on | off
    # Triton kernels (gpt/kernels); torch by default until bench/kernels_bench.py shows them faster at the shapes.
    # ce_kernel=triton switches the fused loss on (it is one), so fused_loss=off with it is refused
    ce_kernel: str = "torch"       # the fused loss's: triton | torch (losses.py) | auto (triton on CUDA if it imports)
    mlp_kernel: str = "torch"      # leaky_relu2's: triton | torch (inductor) | auto (triton on CUDA if it imports)
    resume_every_s: float = 60.0   # seconds between resumable snapshots in the store's work dir
    log_every: int = 10

    def __post_init__(self):
        checks.choices(self, "train", {"muon_schedule": ("ns5", "polar_express"), "device": ("auto", "cpu", "cuda"),
                                       "loader": ("stream", "shard_spans"), "clip_scope": ("global", "local"),
                                       "compile": ("auto", "on", "off"), "fused_loss": ("auto", "on", "off"),
                                       "ce_kernel": KERNEL_CHOICES, "mlp_kernel": KERNEL_CHOICES})
        checks.need(not (self.ce_kernel == "triton" and self.fused_loss == "off"),
                    "train.ce_kernel=triton is the fused loss's kernel, but train.fused_loss=off turns that loss off")
        checks.ints(self, "train", ("seq_len", "batch_tokens", "micro_batch_tokens", "nproc", "log_every"), 1)
        checks.ints(self, "train", ("seed",), -2**63)
        checks.ints(self, "train", ("max_steps", "muon_momentum_warmup_steps", "warmup_steps", "swa_every", "warmdown_steps",
                                    "compile_warmup_steps"))
        checks.reals(self, "train", ("max_seconds", "matrix_lr", "embed_lr", "scalar_lr", "muon_weight_decay",
                                     "grad_clip", "resume_every_s", "embed_weight_decay", "scalar_weight_decay"))
        checks.reals(self, "train", ("adam_beta2",), 0.0, 1.0, hi_open=True)
        checks.reals(self, "train", ("recur_from_frac", "warmdown_frac", "min_lr_frac"), 0.0, 1.0)
        checks.reals(self, "train", ("muon_momentum", "muon_momentum_warmup_start", "ema_decay"), 0.0, 1.0, hi_open=True)
        checks.need(self.max_seconds > 0 or self.max_steps > 0,
                    f"train.max_seconds={self.max_seconds} with max_steps=0 sets no limit: training would never stop "
                    f"(give max_seconds > 0, or max_steps > 0 to stop by steps alone)")
        # what the training loop needs (stages/train.py's train()): the global batch splits into nproc processes
        # x whole sequences, and each process's batch into whole micro-batches of whole sequences
        local, rem = divmod(self.batch_tokens, self.nproc)
        checks.need(not rem and local % self.seq_len == 0,
                    f"train.batch_tokens={self.batch_tokens} must split into nproc={self.nproc} processes x whole "
                    f"sequences of seq_len={self.seq_len}")
        micro = min(self.micro_batch_tokens, local)
        checks.need(local % micro == 0 and micro % self.seq_len == 0,
                    f"train.micro_batch_tokens={self.micro_batch_tokens} must divide the per-process batch {local} "
                    f"(batch_tokens / nproc) and be a multiple of seq_len={self.seq_len}")


TrainConfig.NOT_IN_KEY = ("resume_every_s", "log_every")  # bookkeeping only: the same weights either way


class TrainingDiverged(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """A stop signal ended the run at a step boundary, after a snapshot: rerunning resumes from it."""


class StopSignal:
    """SIGTERM or SIGINT during the timed loop asks for a stop at the next step boundary, where every rank
    saves a snapshot (a collective) before the run ends. A second signal stops at once if it is SIGINT or
    comes over ``repeat_s`` after the first (a stop often arrives twice at once: from torchrun and from a
    scheduler killing every process). The handlers exist only inside the ``with`` and only in the main
    thread (elsewhere ``requested`` stays None); they only set flags (logging here could re-enter a write)."""

    def __init__(self, repeat_s: float = 2.0):
        self.requested: str | None = None
        self.previous: dict = {}
        self.first_at = 0.0
        self.repeat_s = repeat_s

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested, self.first_at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT or time.monotonic() - self.first_at > self.repeat_s:
            self.__exit__()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# --- data ---------------------------------------------------------------------------------------
class TokenStream:
    """Contiguous (x, y) batches from the train shards, each process taking its own slice; wraps around.

    Cut as the official baseline's loader cuts them: each micro-batch reads world * (micro_tokens + 1) tokens,
    process r taking the r-th slice of micro_tokens + 1, and the next micro-batch starts after them (no token is
    read twice). micro_tokens=None reads the whole step as one micro-batch."""

    def __init__(self, paths: list[Path], rank: int, world: int, micro_tokens: int | None = None):
        self.paths, self.rank, self.world, self.micro_tokens = paths, rank, world, micro_tokens
        self.shard, self.pos = 0, 0
        self.tokens = load_tokens(paths[0])

    def state(self) -> dict:
        return {"shard": self.shard, "pos": self.pos}

    def load_state(self, s: dict) -> None:
        if s.get("loader", "stream") != "stream" and type(self) is TokenStream:
            raise ValueError(f"the snapshot's data position is the {s['loader']} loader's, not the stream's: resume "
                             f"with the train.loader it was written with, or start afresh")
        self.shard, self.pos = s["shard"], s["pos"]
        self.tokens = load_tokens(self.paths[self.shard])

    def _take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.shard = (self.shard + 1) % len(self.paths)
                self.tokens, self.pos = load_tokens(self.paths[self.shard]), 0
            chunk = self.tokens[self.pos:self.pos + n]
            out.append(np.asarray(chunk))
            self.pos += len(chunk)
            n -= len(chunk)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def next_batch(self, local_tokens: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (local_tokens // seq_len, seq_len) for this process, on ``device``.

        One host-to-device copy per call: call it once per optimizer step and slice micro-batches on the
        device, so the copy's synchronisation happens once, while the GPU is idle anyway.
        """
        micro = self.micro_tokens or local_tokens
        spans = []
        for _ in range(local_tokens // micro):
            span = self._take(self.world * (micro + 1))  # every process reads the same span
            start = self.rank * (micro + 1)
            spans.append(span[start:start + micro + 1])
        buf = torch.from_numpy(np.stack(spans).astype(np.int32))
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        buf = buf.long()  # (micro-batches, micro + 1): each one's last token is a target only
        return buf[:, :-1].reshape(-1, seq_len), buf[:, 1:].reshape(-1, seq_len)


class ShardSpans(TokenStream):
    """The records' loader: each micro-batch is one span of micro_tokens + 1 per process (processes side by side),
    cut from the current shard from its first BOS on; a span that would run past the shard's end moves to the next
    shard (after the last, the first), so each pass over the data repeats the same rows."""

    def __init__(self, paths: list[Path], rank: int, world: int, micro_tokens: int, bos_id: int):
        self.bos_id = bos_id
        super().__init__(paths, rank, world, micro_tokens)
        self.pos = self.first_bos()

    def first_bos(self) -> int:
        hits = np.flatnonzero(np.asarray(self.tokens) == self.bos_id)
        return int(hits[0]) if len(hits) else 0

    def state(self) -> dict:
        return {**super().state(), "loader": "shard_spans"}

    def load_state(self, s: dict) -> None:
        if s.get("loader") != "shard_spans":
            raise ValueError("the snapshot's data position is the stream loader's, not shard_spans': resume with the "
                             "train.loader it was written with, or start afresh")
        super().load_state(s)

    def next_span(self) -> np.ndarray:
        span = self.micro_tokens + 1
        for _ in range(len(self.paths) + 1):
            if self.pos + span * self.world <= len(self.tokens):
                break
            self.shard = (self.shard + 1) % len(self.paths)
            self.tokens = load_tokens(self.paths[self.shard])
            self.pos = self.first_bos()
        else:
            raise ValueError(f"no train shard holds {span * self.world:,} tokens: one micro-batch span per process")
        start = self.pos + self.rank * span
        self.pos += span * self.world
        return np.asarray(self.tokens[start:start + span])

    def next_batch(self, local_tokens: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        spans = [self.next_span() for _ in range(local_tokens // self.micro_tokens)]
        buf = torch.from_numpy(np.stack(spans).astype(np.int32))
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        buf = buf.long()  # (micro-batches, micro_tokens + 1): each one's last target is never an input
        return buf[:, :-1].reshape(-1, seq_len), buf[:, 1:].reshape(-1, seq_len)


# --- helpers ---------------------------------------------------------------------------------------
def split_params(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """matrix (the weights of the blocks' linear layers: Q, K, V, out, MLP in and out) -> Muon; embed and
    scalar (everything else: gains, scales, mixes, gates, lane lambdas, whatever their shape) -> Adam."""
    matrices = {id(m.weight) for m in model.blocks.modules() if isinstance(m, Linear)}
    groups = {"matrix": [], "embed": [], "scalar": []}
    for name, p in model.named_parameters():
        if name == "embed.weight":
            groups["embed"].append(p)
        elif id(p) in matrices:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def use_fused_loss(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device) -> bool:
    # measured on an H100: +4% tokens/s at vocab 8192, -9% at vocab 1024 (small logits fuse well anyway)
    return cfg.fused_loss == "on" or cfg.ce_kernel == "triton" or (
        cfg.fused_loss == "auto" and device.type == "cuda" and mcfg.vocab_size >= 4096)


def attach_kernels(model: GPT, cfg: TrainConfig, device: torch.device) -> dict[str, str]:
    """Plug the config's loss and MLP activation into the model; what runs, for the log and train.json.

    ce: triton (the fused loss through gpt/kernels/softcap_ce) | torch-fused (gpt/losses.py) | torch (plain
    logits + F.cross_entropy). mlp: triton | torch | none (relu^2 has no kernel). The kernel modules import
    triton, so they are imported only when picked."""
    mcfg = model.cfg
    ce = "torch"
    if use_fused_loss(cfg, mcfg, device):
        ce, model.loss_fn = "torch-fused", fused_softcap_cross_entropy
        if use_triton(cfg.ce_kernel, device):
            from .kernels.softcap_ce import fused_softcap_cross_entropy as triton_ce
            ce, model.loss_fn = "triton", triton_ce
    mlp = "none" if mcfg.mlp_activation != "leaky_relu2" else "torch"
    if mlp == "torch" and use_triton(cfg.mlp_kernel, device):
        from .kernels.leaky_relu2 import leaky_relu2
        for block in model.blocks:
            block.mlp.act_fn = leaky_relu2
        mlp = "triton"
    return {"ce": ce, "mlp": mlp}


def build_optimizers(cfg: TrainConfig, model: GPT, device: torch.device, shard: bool = False) -> list:
    """[Muon for the blocks' matrices, Adam for the embedding and the scalars], as the config says."""
    groups = split_params(model)
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, schedule=cfg.muon_schedule,
                row_norm=cfg.muon_row_norm, weight_decay=cfg.muon_weight_decay, shard=shard)
    adam_groups = [{"params": groups["embed"], "lr": cfg.embed_lr}, {"params": groups["scalar"], "lr": cfg.scalar_lr}]
    common = dict(betas=(0.9, cfg.adam_beta2), eps=1e-8, fused=device.type == "cuda")
    if cfg.embed_weight_decay or cfg.scalar_weight_decay:  # decoupled: p *= 1 - lr * wd, with the scheduled lr
        adam_groups[0]["weight_decay"], adam_groups[1]["weight_decay"] = cfg.embed_weight_decay, cfg.scalar_weight_decay
        adam = torch.optim.AdamW(adam_groups, **common)
    else:  # plain Adam, as before the decays existed
        adam = torch.optim.Adam(adam_groups, **common)
    return [muon, adam]


def warmdown_left(cfg: TrainConfig, progress: float, steps_left: float | None = None) -> float | None:
    """The fraction of the warmdown still ahead (1 at its start, 0 at the end), or None before it begins.

    By steps (warmdown_steps > 0): ``steps_left`` is the trainer's estimate of the steps before the first limit;
    by fraction: what is left of the budget's last warmdown_frac."""
    if cfg.warmdown_steps > 0:
        if steps_left is None or steps_left > cfg.warmdown_steps:
            return None
        return max(steps_left, 0.0) / cfg.warmdown_steps
    if cfg.warmdown_frac > 0 and progress >= 1 - cfg.warmdown_frac:
        return (1 - progress) / cfg.warmdown_frac
    return None


def lr_multiplier(cfg: TrainConfig, step: int, progress: float, steps_left: float | None = None) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    left = warmdown_left(cfg, progress, steps_left)
    return 1.0 if left is None else max(left, cfg.min_lr_frac)


def _installed(module: str) -> bool:
    """Whether ``module`` is installed, importing nothing: find_spec on "flash_attn.cute" would run flash_attn's
    __init__ (FA2's CUDA extension), and whatever that raises would end a run over a log line."""
    import importlib.util
    top, _, sub = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None or not sub:
        return spec is not None
    return any((Path(d) / sub).is_dir() or (Path(d) / f"{sub}.py").is_file()
               for d in (spec.submodule_search_locations or ()))


def attention_backend(mcfg: ModelConfig, device: torch.device) -> str:
    """Which attention kernel the model will use here, and what is installed, for the log and train.json."""
    import importlib.util
    installed = [m for m in FLASH_VARLEN_MODULES if _installed(m)]
    have = f"flash-attn installed: {', '.join(installed) or 'none'}"
    if not mcfg.doc_isolation:
        return f"sdpa causal (documents not isolated); {have}"
    if device.type == "cuda":
        fn = varlen_attention_for(device)
        if fn is not None:
            return f"flash-attn varlen ({fn.__module__}.{fn.__name__}) on the packed documents; {have}"
        broken = "".join(f" ({m} would not import: {FLASH_VARLEN_ERRORS[m][:160]})"
                         for m in installed if m in FLASH_VARLEN_ERRORS)
        return f"flex_attention with a per-document block mask; {have}{broken}"
    return f"sdpa with a dense per-document mask (CPU); {have}"


def save_atomic(obj, path: Path) -> None:
    """torch.save to ``path.part``, renamed into place. If that fails the part file is removed (on a full disk it
    is what fills it); a write the disk refused (torch reports a full disk as "unexpected pos ...") is an OSError
    with the disk's errno naming ``path``, and another failed write a RuntimeError naming it."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        torch.save(obj, part)
        os.replace(part, path)
    except BaseException as e:
        refused = disk_refusal((part,))  # before the part file is removed: it is what fills the disk
        with contextlib.suppress(OSError):
            part.unlink()
        if isinstance(e, OSError) and e.errno:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        if isinstance(e, RuntimeError) and refused is not None and any(m in str(e) for m in TORCH_WRITE_FAILED):
            raise OSError(refused[0], os.strerror(refused[0]), str(path)) from e
        if isinstance(e, RuntimeError):
            raise RuntimeError(f"could not write {path}: {e}") from e
        raise


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class WeightsEMA:
    """An exponential moving average of the weights, updated in place by one foreach lerp per step."""

    def __init__(self, model: GPT, decay: float):
        self.decay = decay
        self.tensors = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self._bind(model)

    def _bind(self, model: GPT) -> None:
        # the live tensors, listed once: every update of the weights happens in place
        self._ema, self._live = (list(t) for t in zip(*((self.tensors[k], v.detach())
                                                          for k, v in model.state_dict().items())))
        self._one_kernel = all(e.dtype == v.dtype for e, v in zip(self._ema, self._live))

    def load(self, model: GPT, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.tensors = {k: v.to(device) for k, v in tensors.items()}
        self._bind(model)

    @torch.no_grad()
    def update(self) -> None:
        if self._one_kernel:
            torch._foreach_lerp_(self._ema, self._live, 1 - self.decay)
        else:
            for e, v in zip(self._ema, self._live):
                e.lerp_(v.float(), 1 - self.decay)

    def cpu(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.tensors.items()}


@dataclass
class Clock:
    """Training seconds: those of earlier segments (a resume) plus this one's since ``start``."""
    before: float = 0.0
    t0: float = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return self.before + (time.perf_counter() - self.t0)


class Trainer:
    """One rank of a training run: rank 0 writes ``out`` (weights, metrics) and ``work`` (snapshots, checkpoints)."""

    def __init__(self, cfg: TrainConfig, train_shards: list[Path], vocab_size: int, out: Path, work: Path):
        self.cfg, self.out, self.work = cfg, out, work
        self.device = resolve_device(cfg.device, "train.device")
        self.ranks: Ranks = start_distributed(self.device)
        self.master = self.ranks.rank == 0
        self.mcfg = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=vocab_size)
        if self.mcfg.vocab_size < vocab_size:
            raise ValueError(f"train.model.vocab_size={self.mcfg.vocab_size} but the tokenizer has {vocab_size} "
                             f"pieces: set it to {vocab_size} (or 0 to follow the tokenizer)")
        world = self.ranks.world
        self.local_tokens, rem = divmod(cfg.batch_tokens, world)
        if rem or self.local_tokens % cfg.seq_len:
            raise ValueError(f"batch_tokens={cfg.batch_tokens} must split into {world} processes x whole "
                             f"sequences of seq_len={cfg.seq_len}")
        self.micro = min(cfg.micro_batch_tokens, self.local_tokens)
        if self.local_tokens % self.micro or self.micro % cfg.seq_len:
            raise ValueError(f"micro_batch_tokens={self.micro} must divide the per-process batch "
                             f"{self.local_tokens} and be a multiple of seq_len={cfg.seq_len}")
        self.grad_accum = self.local_tokens // self.micro
        self.stream = (ShardSpans(train_shards, self.ranks.rank, world, self.micro, self.mcfg.bos_id)
                       if cfg.loader == "shard_spans" else TokenStream(train_shards, self.ranks.rank, world, self.micro))
        self.step_no, self.metrics, self.resumed_from = 0, [], None
        self.clock, self.last_snapshot, self.warmup_seconds = Clock(), 0.0, 0.0
        self.ckpt_dir, self.resume_path = work / "checkpoints", work / "resume.pt"
        self.live = None      # work/metrics.live.jsonl: every step's record as it happens
        self.stopper = None   # the StopSignal of the timed loop
        self.keep_group = False  # train_gpt.py goes on to quantize and evaluate with the same process group
        self.on_step = None      # rank 0, every log_every steps and the last: called with the step's record (its log)
        self.logged_step = -1    # the last step on_step was given

    # --- set up ------------------------------------------------------------------------------------------
    def set_up(self) -> None:
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.mcfg).to(device)
        self.kernels = attach_kernels(self.model, cfg, device)
        self.optimizers = build_optimizers(cfg, self.model, device, shard=self.ranks.distributed)
        self.muon = self.optimizers[0]
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
        self.compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
        fwd = torch.compile(self.model) if self.compiled else self.model
        if self.ranks.distributed:
            fwd = torch.nn.parallel.DistributedDataParallel(
                fwd, device_ids=[device.index] if device.type == "cuda" else None)
        self.fwd = fwd
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.ema = WeightsEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    # --- one optimizer step ----------------------------------------------------------------------------------
    def step(self, step: int, lr_mult: float) -> torch.Tensor:
        """Forward and backward over the micro-batches, clip, schedule momentum and LR, step: the summed loss."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        xs, ys = self.stream.next_batch(self.local_tokens, cfg.seq_len, self.device)
        rows = self.micro // cfg.seq_len
        local_clip = cfg.grad_clip > 0 and cfg.clip_scope == "local" and self.ranks.distributed
        for i in range(self.grad_accum):
            x, y = xs[i * rows:(i + 1) * rows], ys[i * rows:(i + 1) * rows]
            last = i == self.grad_accum - 1
            # DDP averages in the last backward; a local clip needs this rank's own gradient first
            deferred = self.ranks.distributed and (local_clip or not last)
            sync = self.fwd.no_sync() if deferred else contextlib.nullcontext()
            with sync, self.autocast:
                loss = self.fwd(x, y) / self.grad_accum
            loss.backward()
            total += loss.detach()
        if local_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            average_grads(list(self.model.parameters()), self.ranks.world)
        elif cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        frac = min(step / max(1, cfg.muon_momentum_warmup_steps), 1.0)
        for g in self.muon.param_groups:
            g["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return total

    # --- compile warm-up: steps run, then the initial state restored (not counted, as the records do) ---------
    def warm_up(self) -> None:
        n, prime = self.cfg.compile_warmup_steps, self.cfg.warmup_primes_muon
        if not n or not (self.compiled or prime):
            return
        t = time.perf_counter()
        if self.master:
            log.info("compiling: %d warm-up steps per graph, then the state is restored%s (not timed)", n,
                     ", all but Muon's momentum" if prime else "")
        init, opt_init, loader_init = cpu_state(self.model), [o.state_dict() for o in self.optimizers], \
            self.stream.state()
        # a recurrence compiles both graphs now, so the switch costs nothing later; each pass counts its steps
        # from 0, as the record's warm-up does (the momentum schedule reads the step)
        initially = self.model.recurrence_active
        for recurrence in ((False, True) if self.mcfg.has_recurrence else (initially,)):
            self.model.recurrence_active = recurrence
            for s in range(n):
                self.step(s, 1.0)
        self.model.recurrence_active = initially
        self.model.load_state_dict(init)
        for opt, sd in zip(self.optimizers, opt_init):
            if not (prime and opt is self.muon):
                opt.load_state_dict(sd)
        self.stream.load_state(loader_init)
        self.warmup_seconds = time.perf_counter() - t
        if self.device.type == "cuda":  # train.json's peak is the timed steps' (the warm-up's compile allocates more)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.master:
            log.info("compile warm-up took %.1f s", self.warmup_seconds)

    # --- resume, snapshot, stop ----------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from work/resume.pt if an earlier segment left one: weights, optimizers, loader, clock, EMA."""
        if self.resume_path.exists():
            snap = torch.load(self.resume_path, map_location="cpu", weights_only=False)
            self.model.load_state_dict(snap["model"])
            for opt, sd in zip(self.optimizers, snap["optimizers"]):
                opt.load_state_dict(sd)
            loader = snap["loader"]
            self.stream.load_state(loader[self.ranks.rank] if isinstance(loader, list) else loader)
            self.step_no, self.clock.before, self.metrics = snap["step"], snap["elapsed"], snap["metrics"]
            if self.ema is not None and snap.get("ema") is not None:
                self.ema.load(self.model, snap["ema"], self.device)
            torch.set_rng_state(snap["rng"])
            self.resumed_from = self.step_no
            if self.master:
                log.info("resumed from step %d (%.1f s of training already done)", self.step_no, self.clock.before)
        self.last_snapshot = self.clock.before
        if self.master:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.live = open(self.work / "metrics.live.jsonl", "w", buffering=1)
            self.live.writelines(json.dumps(m) + "\n" for m in self.metrics)
            log.info("model %s: %.2fM params; %d processes on %s; grad accumulation %d; compile=%s", self.mcfg,
                     self.model.num_params() / 1e6, self.ranks.world, self.device, self.grad_accum, self.compiled)
            log.info("attention: %s; fused loss: %s; kernels: %s", attention_backend(self.mcfg, self.device),
                     hasattr(self.model, "loss_fn"), self.kernels)

    def snapshot(self, elapsed: float) -> None:
        """Everything a rerun needs to go on from this step (a collective: every rank calls it)."""
        stream_states = [None] * self.ranks.world
        if self.ranks.distributed:
            dist.all_gather_object(stream_states, self.stream.state())
        else:
            stream_states = [self.stream.state()]
        states = [o.full_state_dict() if isinstance(o, Muon) else o.state_dict() for o in self.optimizers]
        if self.master:
            save_atomic({"model": cpu_state(self.model), "optimizers": states, "loader": stream_states,
                         "step": self.step_no, "elapsed": elapsed, "metrics": self.metrics,
                         "ema": self.ema.cpu() if self.ema is not None else None, "rng": torch.get_rng_state()},
                        self.resume_path)
        self.last_snapshot = elapsed

    def agree(self, loss_sum: torch.Tensor) -> tuple[float, float, bool]:
        """The mean loss over ranks, rank 0's clock and whether any rank was asked to stop, in one all-reduce:
        every rank then takes the same decisions (stop, warmdown, recurrence switch, snapshot). Per-rank clocks
        differ by a little, and a rank that stopped or switched graphs one step before another would hang
        the job."""
        elapsed, asked = self.clock.now(), self.stopper is not None and self.stopper.requested is not None
        if not self.ranks.distributed:
            return loss_sum.item(), elapsed, asked
        f64 = dict(device=self.device, dtype=torch.float64)
        t = torch.stack([loss_sum.double(), torch.tensor(elapsed if self.master else 0.0, **f64),
                         torch.tensor(float(asked), **f64)])
        dist.all_reduce(t)
        loss, clock, stops = t.tolist()
        return loss / self.ranks.world, clock, stops > 0

    def stop(self, elapsed: float, saved: bool) -> None:
        """Every rank is here at the same step (the stop flag came through the all-reduce): save, end."""
        why = (self.stopper.requested if self.stopper else None) or "a signal to another rank"
        step = self.step_no
        if self.master:
            log.warning("%s: stopping at step %d after %.1f s of training; saving a snapshot", why, step, elapsed)
        if not saved:
            self.snapshot(elapsed)
        self.close_progress(elapsed, why)
        if self.master:
            log.warning("snapshot saved at step %d: the same command resumes from here", step)
        self.ranks.close()
        raise TrainingInterrupted(f"stopped by {why} at step {step} ({elapsed:.1f} s of training); "
                                  f"a snapshot was saved: the same command resumes from it")

    # --- the timed loop ----------------------------------------------------------------------------------------
    def progress(self, elapsed: float) -> float:
        """The fraction of the budget used: of the seconds, or of the steps when they end first."""
        cfg = self.cfg
        p = elapsed / cfg.max_seconds if cfg.max_seconds > 0 else 0.0
        return max(p, self.step_no / cfg.max_steps) if cfg.max_steps else p

    def steps_left(self, elapsed: float) -> float:
        """Steps before the first limit: the step cap's exact count, the clock's from the mean step time so far (as
        the official baseline's iteration warmdown does; every rank agrees, elapsed coming from the all-reduce)."""
        cfg, left = self.cfg, math.inf
        if cfg.max_steps:
            left = cfg.max_steps - self.step_no
        if cfg.max_seconds > 0 and self.step_no > 0 and elapsed > 0:
            left = min(left, (cfg.max_seconds - elapsed) / (elapsed / self.step_no))
        return left

    def set_recurrence(self, progress: float) -> None:
        if self.mcfg.has_recurrence:
            active = progress >= self.cfg.recur_from_frac
            if active != self.model.recurrence_active and self.master:
                log.info("recurrence of layers %d-%d %s at step %d", self.mcfg.recur_start, self.mcfg.recur_end,
                         "on" if active else "off", self.step_no)
            self.model.recurrence_active = active

    def record(self, loss: float, lr_mult: float, step_s: float, elapsed: float) -> dict:
        rec = {"step": self.step_no, "loss": round(loss, 5), "lr_mult": round(lr_mult, 5),
               "recurrence": bool(self.model.recurrence_active), "step_ms": round(step_s * 1e3, 2),
               "tokens_per_s": round(self.cfg.batch_tokens / step_s), "elapsed_s": round(elapsed, 3)}
        self.metrics.append(rec)
        if self.live is not None:
            self.live.write(json.dumps(rec) + "\n")
        if self.master and (self.step_no % self.cfg.log_every == 0 or self.step_no == 1):
            self.bar.set_postfix_str(f"step {self.step_no} loss {loss:.4f} {rec['tokens_per_s']:,} tok/s")
            self.bar.n = min(elapsed, self.cfg.max_seconds)
            self.bar.refresh()
            self.log_step(rec)
        return rec

    def log_step(self, rec: dict) -> None:
        """``on_step`` once per logged step (the loop's last step is logged after the loop, whatever its number)."""
        if self.on_step is not None and rec["step"] != self.logged_step:
            self.on_step(rec)
            self.logged_step = rec["step"]

    def save_due(self, elapsed: float) -> tuple[bool, bool]:
        """(a warmdown checkpoint for SWA is due, a resumable snapshot is due) after this step; saves them."""
        cfg, step = self.cfg, self.step_no
        in_warmdown = warmdown_left(cfg, self.progress(elapsed), self.steps_left(elapsed)) is not None
        swa_due = bool(cfg.swa_every and in_warmdown and step % cfg.swa_every == 0)
        if self.master and swa_due:
            save_atomic(cpu_state(self.model), self.ckpt_dir / f"step_{step:06d}.pt")
        snapshot_due = bool(cfg.resume_every_s and elapsed - self.last_snapshot > cfg.resume_every_s)
        if snapshot_due:
            self.snapshot(elapsed)
        return swa_due, snapshot_due

    def run(self) -> str:
        """Steps until the time or step limit: why it stopped. A stop signal ends it with TrainingInterrupted."""
        cfg = self.cfg
        self.bar = progress_bar(log, "train", total=cfg.max_seconds, unit="s", enabled=self.master,
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}",
                                initial=min(self.clock.before, cfg.max_seconds))
        self.clock.start()
        elapsed = self.clock.before
        with StopSignal() as self.stopper:
            while (progress := self.progress(elapsed)) < 1.0:
                lr_mult = lr_multiplier(cfg, self.step_no, progress, self.steps_left(elapsed))
                self.set_recurrence(progress)
                t_step = time.perf_counter()
                loss_sum = self.step(self.step_no, lr_mult)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                step_s = time.perf_counter() - t_step
                loss, elapsed, stop_now = self.agree(loss_sum)
                self.step_no += 1
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"training loss is {loss} at step {self.step_no}: stopping "
                                           f"(lower the learning rates or enable grad_clip)")
                if self.ema is not None:
                    self.ema.update()
                self.record(loss, lr_mult, step_s, elapsed)
                swa_due, snapshot_due = self.save_due(elapsed)
                if swa_due or snapshot_due:  # saving took time the stop check must see (every rank agrees on both)
                    _, elapsed, late = self.agree(torch.zeros((), device=self.device))
                    stop_now = stop_now or late
                if stop_now:  # a stop signal on some rank: every rank saves where it is, then the run ends
                    self.stop(elapsed, saved=snapshot_due)
            if self.master and self.metrics:
                self.log_step(self.metrics[-1])
            # a signal after the last step's check: the same, rather than finishing with the stop forgotten
            if self.agree(torch.zeros((), device=self.device))[2]:
                self.stop(elapsed, saved=False)
        if cfg.max_steps and self.step_no >= cfg.max_steps:
            return "max_steps"
        return "max_seconds"

    def close_progress(self, seconds: float, why: str) -> None:
        """The bar's last figures say where training stopped: they are updated only every log_every steps, and
        off a terminal the last line used to show an earlier step and time (a run that looked stuck at 64%)."""
        self.bar.n = min(seconds, self.cfg.max_seconds) if self.cfg.max_seconds > 0 else seconds
        self.bar.set_postfix_str(f"stopped at step {self.step_no}, {seconds:.1f} s: {why}")
        self.bar.close()
        if self.live is not None:
            self.live.close()
            self.live = None

    # --- the end ---------------------------------------------------------------------------------------------
    def finish(self, stop_reason: str) -> dict:
        """Rank 0 writes final.pt, ema.pt, metrics.jsonl, train.json; every rank leaves the process group."""
        cfg, step = self.cfg, self.step_no
        train_seconds = self.clock.now()
        self.close_progress(train_seconds, f"step limit (max_steps={cfg.max_steps})" if stop_reason == "max_steps"
                            else f"time limit (max_seconds={cfg.max_seconds:g})")
        if step == 0:
            raise RuntimeError(f"no training step finished within max_seconds={cfg.max_seconds}")
        result = {}
        if self.master:
            log.info("stopped by %s at step %d after %.1f s of training", stop_reason, step, train_seconds)
            save_atomic(cpu_state(self.model), self.out / "final.pt")
            if self.ema is not None:
                save_atomic(self.ema.cpu(), self.out / "ema.pt")
            with open(self.out / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in self.metrics)
            result = self.summary(stop_reason, train_seconds)
            (self.out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
        if self.ranks.distributed:
            dist.barrier()
        if not self.keep_group:
            self.ranks.close()
        return result

    def summary(self, stop_reason: str, train_seconds: float) -> dict:
        cfg, world = self.cfg, self.ranks.world
        timed = self.metrics[min(len(self.metrics) - 1, 5):]  # skip the first steps' start-up cost
        tok_s = sum(m["tokens_per_s"] for m in timed) / len(timed)
        # model FLOPs by golf's count: a step with the recurrence on runs the looped layers' extra calls
        flops = {phase: flops_per_token(self.mcfg, cfg.seq_len, phase) for phase in (False, True)}
        flop_s = sum(m["tokens_per_s"] * flops[m.get("recurrence", False)] for m in timed) / len(timed)
        by_phase = {}
        for phase in (False, True):
            ms = sorted(m["step_ms"] for m in timed if m.get("recurrence", False) == phase)
            if ms:
                by_phase["with" if phase else "without"] = round(cfg.batch_tokens / (ms[len(ms) // 2] / 1e3))
        return {
            "steps": self.step_no, "stop_reason": stop_reason, "train_seconds": round(train_seconds, 3),
            "warmup_seconds": round(self.warmup_seconds, 3), "tokens": self.step_no * cfg.batch_tokens,
            "tokens_per_s": round(tok_s), "tokens_per_s_per_process": round(tok_s / world),
            "tflops_per_s": round(flop_s / 1e12, 3),
            # this process's peak of allocated GPU memory over the timed steps (None off CUDA)
            "peak_memory_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            if self.device.type == "cuda" else None,
            "median_tokens_per_s_by_recurrence": by_phase,
            "final_train_loss": float(np.mean([m["loss"] for m in self.metrics[-10:]])),
            "params": self.model.num_params(), "world_size": world, "device": str(self.device.type),
            "grad_accum": self.grad_accum, "compiled": self.compiled, "resumed_from_step": self.resumed_from,
            "attention": attention_backend(self.mcfg, self.device), "fused_loss": hasattr(self.model, "loss_fn"),
            "kernels": self.kernels,
            "checkpoints": sorted(p.name for p in self.ckpt_dir.glob("*.pt")) if self.master else [],
            "model_config": dataclasses.asdict(self.mcfg),
        }


def train(cfg: TrainConfig, train_shards: list[Path], vocab_size: int, out: Path, work: Path,
          keep_group: bool = False, on_step=None) -> dict:
    """Train in this process (one rank of a torchrun job, or alone): the run's figures (rank 0; {} elsewhere).
    ``keep_group``: the ranks stay in the process group afterwards (train_gpt.py evaluates with it).
    ``on_step``: rank 0 calls it with each logged step's record as it happens (train_gpt.py's log lines)."""
    trainer = Trainer(cfg, train_shards, vocab_size, out, work)
    trainer.keep_group, trainer.on_step = keep_group, on_step
    trainer.set_up()
    trainer.warm_up()
    trainer.resume()
    result = trainer.finish(trainer.run())
    if trainer.ranks.distributed:
        # never freed: freeing DDP's reducer destroys the gloo group, whose destructor joins a gloo thread that
        # waits for the GIL this thread holds (seen: a 2-process CPU test hung there for 14 min after writing its
        # results). A torchrun rank leaves soon after, by os._exit (artifacts.worker), without destructors
        KEEP_UNTIL_EXIT.append(trainer)
    return result


KEEP_UNTIL_EXIT: list = []
