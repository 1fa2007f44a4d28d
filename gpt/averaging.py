"""Weight averaging: SWA over warmdown checkpoints, and scoring candidates on held-out *training* tokens.

Part of the core (it ships in train_gpt.py): torch, numpy and the core only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checks
from .model import GPT, ModelConfig
from .scoring import score_stream
from .shards import load_tokens

log = logging.getLogger("golf.average")
METHODS = ("swa", "ema", "final", "best")


@dataclass(frozen=True)
class AverageConfig:
    method: str = "best"        # swa | ema | final | best (lowest held-out loss among those available)
    swa_start_step: int = 0     # SWA window: only checkpoints saved at or after this step (0 = from the first)
    swa_stride: int = 1         # SWA window: every k-th checkpoint of the window (1 = each one saved)
    swa_last: int = 0           # SWA window: at most the last K of those (0 = all of them)
    swa_include_final: bool = True  # the final weights join the SWA average
    heldout_tokens: int = 65536  # tokens of training data used to compare the candidates
    heldout_seq_len: int = 0    # window for that comparison (0 = the training seq_len)
    device: str = "auto"        # auto | cpu | cuda: where the candidates are scored

    def __post_init__(self):
        checks.choices(self, "average", {"method": METHODS, "device": ("auto", "cpu", "cuda")})
        checks.ints(self, "average", ("swa_stride", "heldout_tokens"), 1)
        checks.ints(self, "average", ("swa_start_step", "swa_last", "heldout_seq_len"))


def checkpoint_step(name: str) -> int:
    """checkpoints/step_000150.pt -> 150."""
    try:
        return int(Path(name).stem.rpartition("_")[2])
    except ValueError:
        raise ValueError(f"average: cannot read a step number from checkpoint {name!r}") from None


def swa_window(names: list[str], start_step: int = 0, stride: int = 1, last: int = 0) -> list[str]:
    """The checkpoints SWA averages: from ``start_step``, every ``stride``-th (the latest kept), the ``last``."""
    if stride < 1:
        raise ValueError(f"average.swa_stride must be >= 1, not {stride}")
    picked = sorted((n for n in names if checkpoint_step(n) >= start_step), key=checkpoint_step)
    picked = picked[::-1][::stride][::-1]  # keep the latest checkpoint whatever the stride
    return picked[-last:] if last else picked


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def swa(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of several state dicts, in float32."""
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in states[0].items()}
    for s in states:
        for k, v in s.items():
            out[k] += v.float()
    return {k: v / len(states) for k, v in out.items()}


class HeldoutScorer:
    """Mean NLL (nats/token) of state dicts of one model config on held-out training tokens, on ``device``:
    the average stage compares its candidates with it, quantize's cap fit its schemes."""

    def __init__(self, model_cfg: ModelConfig, tokens: np.ndarray, seq_len: int, device: torch.device):
        self.model = GPT(model_cfg).to(device).eval()
        self.tokens, self.seq_len, self.device = tokens, seq_len, device

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        return float(score_stream(self.model, self.tokens, self.seq_len, 0, 16, self.device).mean())


def heldout_tokens(train_shards: list[Path], n: int) -> np.ndarray:
    """The last n+1 tokens of the last train shard (never val; training reaches them last, if at all)."""
    return np.asarray(load_tokens(train_shards[-1])[-(n + 1):])


def load_averaged(weights: Path, report: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The averaged weights and their model config: an average artifact's weights.pt and average.json."""
    return ModelConfig(**json.loads(Path(report).read_text())["model_config"]), load_state(weights)


@dataclass
class Averaged:
    """What averaging one training run chose: the weights, average.json's report, the stage's metrics."""
    state: dict[str, torch.Tensor]
    report: dict
    metrics: dict


def candidates(cfg: AverageConfig, final: Path, ema: Path | None, ckpts: dict[str, Path]) -> tuple[dict, list[str]]:
    """The weights to choose from (final, EMA, SWA over the configured window) and the SWA members' names.
    ``ckpts`` maps each warmdown checkpoint's name (checkpoints/step_000150.pt) to its file."""
    out: dict[str, dict] = {"final": load_state(final)}
    if ema is not None:
        out["ema"] = load_state(ema)
    window = swa_window(list(ckpts), cfg.swa_start_step, cfg.swa_stride, cfg.swa_last)
    members = list(window)
    if cfg.method == "swa" and not window and not cfg.swa_include_final:
        raise ValueError(f"average: the SWA window (swa_start_step={cfg.swa_start_step}, swa_stride={cfg.swa_stride}, "
                         f"swa_last={cfg.swa_last}) selects none of the {len(ckpts)} checkpoints")
    if window or cfg.method == "swa":
        states = [load_state(ckpts[c]) for c in window]
        if cfg.swa_include_final:
            states.append(out["final"])
            members.append("final.pt")
        out["swa"] = swa(states)
    if cfg.method != "best" and cfg.method not in out:
        raise ValueError(f"average.method={cfg.method} but the train artifact has no {cfg.method} weights "
                         f"(set train.ema_decay > 0 for EMA, train.swa_every > 0 for SWA)")
    return out, members


def average_run(cfg: AverageConfig, model_cfg: ModelConfig, final: Path, ema: Path | None, ckpts: dict[str, Path],
                train_shards: list[Path], trained_tokens: int, train_seq_len: int, device: torch.device) -> Averaged:
    """Score every candidate on held-out training tokens and keep the configured one (or the best): the average
    stage's work, and train_gpt.py's after its training loop."""
    found, members = candidates(cfg, final, ema, ckpts)
    tokens = heldout_tokens(train_shards, cfg.heldout_tokens)
    total_train = sum(len(load_tokens(p)) for p in train_shards)
    seen = trained_tokens > total_train - len(tokens)  # whether training may have reached this slice
    t0 = time.perf_counter()
    scorer = HeldoutScorer(model_cfg, tokens, cfg.heldout_seq_len or train_seq_len, device)
    losses = {name: scorer(st) for name, st in found.items()}
    heldout_s = time.perf_counter() - t0
    for name, loss in losses.items():
        log.info("candidate %-5s held-out loss %.4f", name, loss)
    chosen = min(losses, key=losses.get) if cfg.method == "best" else cfg.method
    report = {"chosen": chosen, "heldout_loss": losses, "heldout_tokens": len(tokens) - 1,
              "heldout_may_overlap_training": bool(seen), "swa_members": members}
    metrics = {"chosen": chosen, "heldout_loss": losses[chosen],
               **{f"heldout_loss_{k}": v for k, v in losses.items()}, "swa_checkpoints": len(members),
               # with method=best the choice reads training data after training: the challenge counts that time
               ("selection_seconds" if cfg.method == "best" else "heldout_diagnostic_seconds"): round(heldout_s, 3)}
    return Averaged(found[chosen], report, metrics)
