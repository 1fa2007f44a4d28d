"""train: a GPT trained on the tokenize artifact's train shards under a wallclock cap.

Leaves the final weights, the EMA weights, the checkpoints that weight averaging needs (every
``swa_every`` steps during warmdown), a per-step metrics file and a loss-curve plot. A killed run
resumes from its last resume point when rerun with the same config (the manifest says so). While it
runs, each step's record is appended to ``metrics.live.jsonl`` in the store's work directory for the
stage (``golf-store/work/train-KEY/``), so a long or killed run can be looked at before it ends.

Run it alone (one process):     python -m stages.train --input tokenize=KEY
On 8 GPUs (the stage launches torchrun itself when nproc > 1):
                                python -m stages.train --input tokenize=KEY --set nproc=8
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from artifacts import Artifact, Stage, StageContext
from artifacts.store import write_failure
from . import checks
from .losses import fused_softcap_cross_entropy
from .model import GPT, ModelConfig, flops_per_token, varlen_attention_for
from .optim import Muon
from .shards import load_tokens
from .dataset import Dataset
from .devices import resolve_device
from .launch import die_with_launcher, run_workers, torchrun_command
from .progress import progress_bar
from .published import place

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
    scalar_lr: float = 0.04        # Adam, gains, scales, mixes, skip weights
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_weight_decay: float = 0.0  # decoupled weight decay on the matrices (records: 0.095)
    muon_schedule: str = "ns5"     # ns5 (baseline) | polar_express (records)
    muon_row_norm: bool = False    # MuonEq-R: rows of the update equalised before orthogonalising
    recur_from_frac: float = 0.0   # switch the model's recurrence span on at this fraction of training
    warmup_steps: int = 0          # linear LR warmup
    warmdown_frac: float = 0.25    # final fraction of the budget (time or steps) with LR decaying linearly
    min_lr_frac: float = 0.0       # LR floor during warmdown, as a fraction of the peak
    grad_clip: float = 0.0         # global grad-norm clip (0 = off)
    ema_decay: float = 0.0         # EMA of the weights (0 = off; records: 0.9965)
    swa_every: int = 50            # save a checkpoint every N steps during warmdown (0 = none)
    compile_warmup_steps: int = 20  # steps run before the clock starts to compile and warm up, then undone
    nproc: int = 1                 # processes (GPUs); >1 launches torchrun
    device: str = "auto"           # auto | cpu | cuda
    compile: str = "auto"          # auto (on for cuda) | on | off
    fused_loss: str = "auto"       # fuse projection + softcap + cross-entropy: auto (cuda and vocab >= 4096) | on | off
    resume_every_s: float = 60.0   # seconds between resumable snapshots in the store's work dir
    log_every: int = 10

    def __post_init__(self):
        checks.choices(self, "train", {"muon_schedule": ("ns5", "polar_express"), "device": ("auto", "cpu", "cuda"),
                                       "compile": ("auto", "on", "off"), "fused_loss": ("auto", "on", "off")})
        checks.ints(self, "train", ("seq_len", "batch_tokens", "micro_batch_tokens", "nproc", "log_every"), 1)
        checks.ints(self, "train", ("seed",), -2**63)
        checks.ints(self, "train", ("max_steps", "muon_momentum_warmup_steps", "warmup_steps", "swa_every",
                                    "compile_warmup_steps"))
        checks.reals(self, "train", ("max_seconds", "matrix_lr", "embed_lr", "scalar_lr", "muon_weight_decay",
                                     "grad_clip", "resume_every_s"))
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
    """Contiguous (x, y) batches from the train shards, each process taking its own slice; wraps around."""

    def __init__(self, paths: list[Path], rank: int, world: int):
        self.paths, self.rank, self.world = paths, rank, world
        self.shard, self.pos = 0, 0
        self.tokens = load_tokens(paths[0])

    def state(self) -> dict:
        return {"shard": self.shard, "pos": self.pos}

    def load_state(self, s: dict) -> None:
        self.shard, self.pos = s["shard"], s["pos"]
        self.tokens = load_tokens(self.paths[self.shard])

    def _take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos >= len(self.tokens) - 1:
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
        span = self._take(self.world * local_tokens + 1)  # every process reads the same span
        start = self.rank * local_tokens
        buf = torch.from_numpy(span[start:start + local_tokens + 1].astype(np.int32))
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        buf = buf.long()
        self.pos -= 1  # the next span starts at the last target, as in the official loader
        return buf[:-1].view(-1, seq_len), buf[1:].view(-1, seq_len)


# --- helpers --------------------------------------------------------------------------------------
def split_params(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """matrix -> Muon; embed and scalar -> Adam."""
    groups = {"matrix": [], "embed": [], "scalar": []}
    for name, p in model.named_parameters():
        if name == "embed.weight":
            groups["embed"].append(p)
        elif name.startswith("blocks.") and p.ndim == 2 and "resid_mix" not in name:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def use_fused_loss(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device) -> bool:
    # measured on an H100: +4% tokens/s at vocab 8192, -9% at vocab 1024 (small logits fuse well anyway)
    return cfg.fused_loss == "on" or (cfg.fused_loss == "auto" and device.type == "cuda" and mcfg.vocab_size >= 4096)


def build_optimizers(cfg: TrainConfig, model: GPT, device: torch.device, shard: bool = False) -> list:
    """[Muon for the blocks' matrices, Adam for the embedding and the scalars], as the config says."""
    groups = split_params(model)
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, schedule=cfg.muon_schedule,
                row_norm=cfg.muon_row_norm, weight_decay=cfg.muon_weight_decay, shard=shard)
    adam = torch.optim.Adam([{"params": groups["embed"], "lr": cfg.embed_lr},
                             {"params": groups["scalar"], "lr": cfg.scalar_lr}],
                            betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    return [muon, adam]


def lr_multiplier(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.warmdown_frac > 0 and progress >= 1 - cfg.warmdown_frac:
        return max((1 - progress) / cfg.warmdown_frac, cfg.min_lr_frac)
    return 1.0


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_atomic(obj, path: Path) -> None:
    """torch.save to ``path.part``, renamed into place. If that fails the part file is removed (on a full disk it
    is what fills it), and a write the disk refused (full, read-only, size limit: torch reports these as
    "unexpected pos ...") is a StoreWriteError naming ``path``; another failed write a RuntimeError naming it."""
    part = path.with_name(path.name + ".part")
    try:
        torch.save(obj, part)
        os.replace(part, path)
    except BaseException as e:
        failed = write_failure(e, path, probe=(part,), any_os_error=True)  # while the part still fills the disk
        with contextlib.suppress(OSError):
            part.unlink()
        if failed is not None and failed is not e:
            raise failed from e
        if isinstance(e, RuntimeError):
            raise RuntimeError(f"could not write {path}: {e}") from e
        raise


def plot_loss(metrics: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU image: the numbers are in metrics.jsonl all the same
        log.warning("matplotlib is not installed: no loss_curve.png")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [m["loss"] for m in metrics], lw=1)
    ax[0].set(xlabel="step", ylabel="train loss (nats)", title="training loss")
    ax[0].grid(alpha=0.3)
    ax[1].plot(steps, [m["lr_mult"] for m in metrics], lw=1, color="tab:orange")
    ax[1].set(xlabel="step", ylabel="LR multiplier", title="schedule")
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the training loop ------------------------------------------------------------------------------
def attention_backend(mcfg: ModelConfig, device: torch.device) -> str:
    """Which attention kernel the model will use here, and what is installed, for the log and train.json."""
    import importlib.util
    installed = [m for m in ("flash_attn_interface", "flash_attn") if importlib.util.find_spec(m)]
    have = f"flash-attn installed: {', '.join(installed) or 'none'}"
    if not mcfg.doc_isolation:
        return f"sdpa causal (documents not isolated); {have}"
    if device.type == "cuda":
        fn = varlen_attention_for(device)
        if fn is not None:
            return f"flash-attn varlen ({fn.__module__}.{fn.__name__}) on the packed documents; {have}"
        return f"flex_attention with a per-document block mask; {have}"
    return f"sdpa with a dense per-document mask (CPU); {have}"


def train(cfg: TrainConfig, dataset_dir: Path, out: Path, work: Path) -> dict:
    """Train in this process (one rank of a torchrun job, or alone). Rank 0 writes ``out``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device, "train.device")
    distributed = world > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))

    ds = Dataset.open(Artifact(dataset_dir, json.loads((dataset_dir / "manifest.json").read_text())))
    mcfg = cfg.model
    if mcfg.vocab_size == 0:
        mcfg = dataclasses.replace(mcfg, vocab_size=ds.vocab_size)
    if mcfg.vocab_size < ds.vocab_size:
        raise ValueError(f"train.model.vocab_size={mcfg.vocab_size} but the tokenizer has {ds.vocab_size} "
                         f"pieces: set it to {ds.vocab_size} (or 0 to follow the tokenizer)")
    local_tokens, rem = divmod(cfg.batch_tokens, world)
    if rem or local_tokens % cfg.seq_len:
        raise ValueError(f"batch_tokens={cfg.batch_tokens} must split into {world} processes x whole "
                         f"sequences of seq_len={cfg.seq_len}")
    micro = min(cfg.micro_batch_tokens, local_tokens)
    if local_tokens % micro or micro % cfg.seq_len:
        raise ValueError(f"micro_batch_tokens={micro} must divide the per-process batch {local_tokens} "
                         f"and be a multiple of seq_len={cfg.seq_len}")
    grad_accum = local_tokens // micro

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    if use_fused_loss(cfg, mcfg, device):
        model.loss_fn = fused_softcap_cross_entropy
    optimizers = build_optimizers(cfg, model, device, shard=distributed)
    muon = optimizers[0]
    for opt in optimizers:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    fwd = torch.compile(model) if use_compile else model
    if distributed:
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    stream = TokenStream(ds.shard_paths("train"), rank, world)

    def step_once(step: int, lr_mult: float) -> float:
        total = torch.zeros((), device=device)
        xs, ys = stream.next_batch(local_tokens, cfg.seq_len, device)
        rows = micro // cfg.seq_len
        for micro_step in range(grad_accum):
            x, y = xs[micro_step * rows:(micro_step + 1) * rows], ys[micro_step * rows:(micro_step + 1) * rows]
            sync = micro_step == grad_accum - 1
            ctx = fwd.no_sync() if distributed and not sync else _null()
            with ctx, autocast:
                loss = fwd(x, y) / grad_accum
            loss.backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        frac = min(step / max(1, cfg.muon_momentum_warmup_steps), 1.0)
        for g in muon.param_groups:
            g["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
            opt.step()
        model.zero_grad(set_to_none=True)
        return total

    # --- compile warm-up: run steps, then restore the initial state (not counted, as the records do)
    t_warm = time.perf_counter()
    if cfg.compile_warmup_steps and use_compile:
        if master:
            log.info("compiling: %d warm-up steps, then the state is restored (not timed)", cfg.compile_warmup_steps)
        init = cpu_state(model)
        opt_init = [opt.state_dict() for opt in optimizers]
        loader_init = stream.state()
        for s in range(cfg.compile_warmup_steps):
            if mcfg.has_recurrence:  # compile both graphs now, so the switch costs nothing later
                model.recurrence_active = s >= cfg.compile_warmup_steps // 2
            step_once(s, 1.0)
        model.load_state_dict(init)
        for opt, sd in zip(optimizers, opt_init):
            opt.load_state_dict(sd)
        stream.load_state(loader_init)
    warmup_seconds = time.perf_counter() - t_warm
    if master and cfg.compile_warmup_steps and use_compile:
        log.info("compile warm-up took %.1f s", warmup_seconds)

    # --- resume
    ckpt_dir = work / "checkpoints"
    resume_path = work / "resume.pt"
    step, elapsed_before, resumed_from = 0, 0.0, None
    metrics: list[dict] = []
    ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if cfg.ema_decay > 0 else None
    if resume_path.exists():
        snap = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(snap["model"])
        for opt, sd in zip(optimizers, snap["optimizers"]):
            opt.load_state_dict(sd)
        stream.load_state(snap["loader"][rank] if isinstance(snap["loader"], list) else snap["loader"])
        step, elapsed_before, metrics = snap["step"], snap["elapsed"], snap["metrics"]
        if ema is not None and snap.get("ema") is not None:
            ema = {k: v.to(device) for k, v in snap["ema"].items()}
        torch.set_rng_state(snap["rng"])
        resumed_from = step
        if master:
            log.info("resumed from step %d (%.1f s of training already done)", step, elapsed_before)
    if ema is not None:  # the live tensors, listed once: every update of the weights happens in place
        ema_t, live_t = zip(*((ema[k], v.detach()) for k, v in model.state_dict().items()))
        one_kernel = all(e.dtype == v.dtype for e, v in zip(ema_t, live_t))

        @torch.no_grad()
        def ema_update() -> None:
            if one_kernel:
                torch._foreach_lerp_(list(ema_t), list(live_t), 1 - cfg.ema_decay)
            else:
                for e, v in zip(ema_t, live_t):
                    e.lerp_(v.float(), 1 - cfg.ema_decay)
    live = None  # work/metrics.live.jsonl: every step's record as it happens (from the snapshot on a resume)
    if master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        live = open(work / "metrics.live.jsonl", "w", buffering=1)
        live.writelines(json.dumps(m) + "\n" for m in metrics)
        n_params = model.num_params()
        log.info("model %s: %.2fM params; %d processes on %s; grad accumulation %d; compile=%s",
                 mcfg, n_params / 1e6, world, device, grad_accum, use_compile)
        log.info("attention: %s; fused loss: %s", attention_backend(mcfg, device), hasattr(model, "loss_fn"))

    def progress_of(step: int, elapsed: float) -> float:
        p = elapsed / cfg.max_seconds if cfg.max_seconds > 0 else 0.0
        if cfg.max_steps:
            p = max(p, step / cfg.max_steps)
        return p

    def snapshot(step: int, elapsed: float) -> None:
        loaders = [None] * world
        if distributed:
            dist.all_gather_object(loaders, stream.state())
        else:
            loaders = [stream.state()]
        states = [o.full_state_dict() if isinstance(o, Muon) else o.state_dict() for o in optimizers]  # collective
        if master:
            save_atomic({"model": cpu_state(model), "optimizers": states,
                         "loader": loaders, "step": step, "elapsed": elapsed, "metrics": metrics,
                         "ema": {k: v.cpu() for k, v in ema.items()} if ema is not None else None,
                         "rng": torch.get_rng_state()}, resume_path)

    # --- the timed loop
    bar = progress_bar(log, "train", total=cfg.max_seconds, unit="s", enabled=master,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}", initial=min(elapsed_before, cfg.max_seconds))
    flops_tok = flops_per_token(mcfg, cfg.seq_len)
    t_start = time.perf_counter()
    stop_reason = "max_seconds"
    tokens_per_step = cfg.batch_tokens

    def shared(loss_sum: torch.Tensor, elapsed: float) -> tuple[float, float, bool]:
        """The mean loss over ranks, rank 0's clock and whether any rank was asked to stop, in one all-reduce:
        every rank then takes the same decisions (stop, warmdown, recurrence switch, snapshot). Per-rank clocks
        differ by a little, and a rank that stopped or switched graphs one step before another would hang
        the job."""
        asked = stopper.requested is not None
        if not distributed:
            return loss_sum.item(), elapsed, asked
        clock = torch.tensor(elapsed if master else 0.0, device=device, dtype=torch.float64)
        t = torch.stack([loss_sum.double(), clock, torch.tensor(float(asked), device=device, dtype=torch.float64)])
        dist.all_reduce(t)
        loss, clock, stops = t.tolist()
        return loss / world, clock, stops > 0

    def close_bar(step: int, seconds: float, why: str) -> None:
        """The bar's last figures say where training stopped: they are updated only every log_every steps, and
        off a terminal the last line used to show an earlier step and time (a run that looked stuck at 64%)."""
        bar.n = min(seconds, cfg.max_seconds) if cfg.max_seconds > 0 else seconds
        bar.set_postfix_str(f"stopped at step {step}, {seconds:.1f} s: {why}")
        bar.close()

    def stop_here(step: int, elapsed: float, saved: bool) -> None:
        """Every rank is here at the same step (the stop flag came through the all-reduce): save, end."""
        why = stopper.requested or "a signal to another rank"
        if master:
            log.warning("%s: stopping at step %d after %.1f s of training; saving a snapshot", why, step, elapsed)
        if not saved:
            snapshot(step, elapsed)
        close_bar(step, elapsed, why)
        if live is not None:
            live.close()
        if master:
            log.warning("snapshot saved at step %d: the same command resumes from here", step)
        if distributed:
            dist.destroy_process_group()
        raise TrainingInterrupted(f"stopped by {why} at step {step} ({elapsed:.1f} s of training); "
                                  f"a snapshot was saved: the same command resumes from it")

    elapsed = elapsed_before
    last_snapshot = elapsed
    with StopSignal() as stopper:
        while True:
            progress = progress_of(step, elapsed)
            if progress >= 1.0:
                stop_reason = "max_steps" if cfg.max_steps and step >= cfg.max_steps else "max_seconds"
                break
            lr_mult = lr_multiplier(cfg, step, progress)
            if mcfg.has_recurrence:
                active = progress >= cfg.recur_from_frac
                if active != model.recurrence_active and master:
                    log.info("recurrence of layers %d-%d %s at step %d", mcfg.recur_start, mcfg.recur_end,
                             "on" if active else "off", step)
                model.recurrence_active = active
            t_step = time.perf_counter()
            loss_sum = step_once(step, lr_mult)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t_step
            loss, elapsed, stop_now = shared(loss_sum, elapsed_before + (time.perf_counter() - t_start))
            step += 1
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training loss is {loss} at step {step}: stopping "
                                       f"(lower the learning rates or enable grad_clip)")
            if ema is not None:
                ema_update()
            rec = {"step": step, "loss": round(loss, 5), "lr_mult": round(lr_mult, 5),
                   "recurrence": bool(model.recurrence_active),
                   "step_ms": round(step_s * 1e3, 2), "tokens_per_s": round(tokens_per_step / step_s),
                   "elapsed_s": round(elapsed, 3)}
            metrics.append(rec)
            if live is not None:
                live.write(json.dumps(rec) + "\n")
            in_warmdown = cfg.warmdown_frac > 0 and progress_of(step, elapsed) >= 1 - cfg.warmdown_frac
            swa_due = bool(cfg.swa_every and in_warmdown and step % cfg.swa_every == 0)
            if master and swa_due:
                save_atomic(cpu_state(model), ckpt_dir / f"step_{step:06d}.pt")
            if master and (step % cfg.log_every == 0 or step == 1):
                bar.set_postfix_str(f"step {step} loss {loss:.4f} {rec['tokens_per_s']:,} tok/s")
                bar.n = min(elapsed, cfg.max_seconds)
                bar.refresh()
                log.debug("step %d loss %.4f lr %.3f %.1f ms", step, loss, lr_mult, rec["step_ms"])
            snapshot_due = bool(cfg.resume_every_s and elapsed - last_snapshot > cfg.resume_every_s)
            if snapshot_due:
                snapshot(step, elapsed)
                last_snapshot = elapsed
            if swa_due or snapshot_due:  # saving took time the stop check must see (every rank agrees on both)
                _, elapsed, late = shared(torch.zeros((), device=device), elapsed_before + (time.perf_counter() - t_start))
                stop_now = stop_now or late
            if stop_now:  # a stop signal on some rank: every rank saves where it is, then the run ends
                stop_here(step, elapsed, saved=snapshot_due)
        # a signal after the last step's check: the same, rather than finishing with the stop forgotten
        if shared(torch.zeros((), device=device), elapsed)[2]:
            stop_here(step, elapsed, saved=False)
    train_seconds = elapsed_before + (time.perf_counter() - t_start)
    close_bar(step, train_seconds, f"step limit (max_steps={cfg.max_steps})" if stop_reason == "max_steps"
              else f"time limit (max_seconds={cfg.max_seconds:g})")
    if live is not None:
        live.close()
    if step == 0:
        raise RuntimeError(f"no training step finished within max_seconds={cfg.max_seconds}")

    result = {}
    if master:
        log.info("stopped by %s at step %d after %.1f s of training", stop_reason, step, train_seconds)
        save_atomic(cpu_state(model), out / "final.pt")
        if ema is not None:
            save_atomic({k: v.cpu() for k, v in ema.items()}, out / "ema.pt")
        link_tree(ckpt_dir, out / "checkpoints")  # work/ keeps them until the artifact is committed
        with open(out / "metrics.jsonl", "w") as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")
        plot_loss(metrics, out / "loss_curve.png")
        timed = metrics[min(len(metrics) - 1, 5):]  # skip the first steps' start-up cost
        tok_s = sum(m["tokens_per_s"] for m in timed) / len(timed)
        by_phase = {}
        for phase in (False, True):
            ms = sorted(m["step_ms"] for m in timed if m.get("recurrence", False) == phase)
            if ms:
                by_phase["with" if phase else "without"] = round(cfg.batch_tokens / (ms[len(ms) // 2] / 1e3))
        result = {
            "steps": step, "stop_reason": stop_reason, "train_seconds": round(train_seconds, 3),
            "warmup_seconds": round(warmup_seconds, 3), "tokens": step * cfg.batch_tokens,
            "tokens_per_s": round(tok_s), "tokens_per_s_per_process": round(tok_s / world),
            "tflops_per_s": round(tok_s * flops_tok / 1e12, 3),
            "median_tokens_per_s_by_recurrence": by_phase,
            "final_train_loss": float(np.mean([m["loss"] for m in metrics[-10:]])),
            "params": model.num_params(), "world_size": world, "device": str(device.type),
            "grad_accum": grad_accum, "compiled": use_compile, "resumed_from_step": resumed_from,
            "attention": attention_backend(mcfg, device), "fused_loss": hasattr(model, "loss_fn"),
            "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("*.pt")),
            "model_config": dataclasses.asdict(mcfg),
        }
        (out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy across file systems) the files of ``src`` into ``dst``: unlike a move, a failure
    before the artifact is committed leaves ``src`` whole for the rerun that resumes."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        place(f, dst / f.name, link=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --- the stage ----------------------------------------------------------------------------------------
def build(cfg: TrainConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    dataset_dir = inputs["tokenize"].path
    under_torchrun = "LOCAL_RANK" in os.environ
    resumed = (ctx.work / "resume.pt").exists()
    if cfg.nproc > 1 and not under_torchrun:
        args = ["--dataset", str(dataset_dir), "--out", str(ctx.dir), "--work", str(ctx.work),
                "--config-json", json.dumps(dataclasses.asdict(cfg))]
        (ctx.dir / "launch.txt").write_text(" ".join(torchrun_command("stages.train", cfg.nproc, args)) + "\n")
        run_workers("stages.train", cfg.nproc, args)
        metrics = json.loads((ctx.dir / "train.json").read_text())
    else:
        (ctx.dir / "launch.txt").write_text(" ".join(sys.argv) + "\n")
        metrics = train(cfg, dataset_dir, ctx.dir, ctx.work)
    if resumed or metrics.get("resumed_from_step") is not None:
        ctx.manifest_extra["resumed"] = {"from_step": metrics.get("resumed_from_step")}
    metrics.pop("checkpoints", None)
    metrics.pop("model_config", None)
    return metrics


STAGE = Stage(name="train", config=TrainConfig, inputs=("tokenize",), build=build, module=__name__)


def _worker_main(argv: list[str]) -> None:
    import argparse
    from golf.config import config_from_dict
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--config-json", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(config_from_dict(TrainConfig, json.loads(a.config_json)), a.dataset, a.out, a.work)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        die_with_launcher()
        _worker_main(sys.argv[1:])
    else:
        from golf.stage_cli import stage_main
        stage_main(STAGE)
