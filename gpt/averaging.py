"""Weight averaging: SWA over warmdown checkpoints, and scoring candidates on held-out *training* tokens.

Part of the core (it ships in train_gpt.py): torch, numpy and the core only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .model import GPT, ModelConfig
from .scoring import score_stream
from .shards import load_tokens


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
