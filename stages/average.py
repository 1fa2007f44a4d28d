"""average: one set of weights from a training run: SWA over warmdown checkpoints, EMA, or final.

The SWA window (first step, stride, count) is config, so a new window is a new average artifact
built from the same train artifact, without retraining. Every candidate (final, EMA, SWA) is scored
on a held-out slice of *training* data (the tail of the last train shard), never on validation data,
so ``method=best`` picks by data without peeking.

Run it alone:  golf stage average --input train=KEY --input tokenize=KEY --set method=swa
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from artifacts import Artifact, Stage, StageContext
from gpt import checks
from gpt.averaging import HeldoutScorer, heldout_tokens, load_averaged, load_state, swa, swa_window
from gpt.devices import resolve_device
from gpt.model import ModelConfig
from tokenizing.dataset import Dataset

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


def build(cfg: AverageConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    if cfg.method not in METHODS:
        raise ValueError(f"average.method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    train_art = inputs["train"]
    info = json.loads(train_art.file("train.json").read_text())
    model_cfg = ModelConfig(**info["model_config"])
    final = load_state(train_art.file("final.pt"))
    candidates: dict[str, dict] = {"final": final}
    if "ema.pt" in train_art.manifest["files"]:
        candidates["ema"] = load_state(train_art.file("ema.pt"))
    ckpts = swa_window(train_art.files("checkpoints/"), cfg.swa_start_step, cfg.swa_stride, cfg.swa_last)
    swa_members = list(ckpts)
    if cfg.method == "swa" and not ckpts and not cfg.swa_include_final:
        raise ValueError(f"average: the SWA window (swa_start_step={cfg.swa_start_step}, swa_stride={cfg.swa_stride}, "
                         f"swa_last={cfg.swa_last}) selects none of the {len(train_art.files('checkpoints/'))} checkpoints")
    if ckpts or cfg.method == "swa":
        states = [load_state(train_art.file(c)) for c in ckpts]
        if cfg.swa_include_final:
            states.append(final)
            swa_members.append("final.pt")
        candidates["swa"] = swa(states)
    if cfg.method not in ("best",) and cfg.method not in candidates:
        raise ValueError(f"average.method={cfg.method} but the train artifact has no {cfg.method} weights "
                         f"(set train.ema_decay > 0 for EMA, train.swa_every > 0 for SWA)")

    tokens = heldout_tokens(Dataset.open(inputs["tokenize"]).shard_paths("train"), cfg.heldout_tokens)
    trained_tokens = info["tokens"]
    total_train = inputs["tokenize"].metrics.get("train_tokens", 0)
    seen = trained_tokens > total_train - len(tokens)  # whether training may have reached this slice
    seq_len = cfg.heldout_seq_len or inputs["train"].config["seq_len"]
    t0 = time.perf_counter()
    scorer = HeldoutScorer(model_cfg, tokens, seq_len, resolve_device(cfg.device, "average.device"))
    losses = {name: scorer(st) for name, st in candidates.items()}
    heldout_s = time.perf_counter() - t0
    for name, loss in losses.items():
        log.info("candidate %-5s held-out loss %.4f", name, loss)
    chosen = min(losses, key=losses.get) if cfg.method == "best" else cfg.method
    torch.save(candidates[chosen], ctx.dir / "weights.pt")
    report = {"chosen": chosen, "heldout_loss": losses, "heldout_tokens": len(tokens) - 1,
              "heldout_may_overlap_training": bool(seen), "swa_members": swa_members,
              "model_config": info["model_config"]}
    (ctx.dir / "average.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"chosen": chosen, "heldout_loss": losses[chosen],
            **{f"heldout_loss_{k}": v for k, v in losses.items()}, "swa_checkpoints": len(swa_members),
            # with method=best the choice reads training data after training: the challenge counts that time
            ("selection_seconds" if cfg.method == "best" else "heldout_diagnostic_seconds"): round(heldout_s, 3)}


STAGE = Stage(name="average", config=AverageConfig, inputs=("train", "tokenize"), build=build, module=__name__,
              headline=("heldout_loss",))


def load_weights(artifact: Artifact) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The averaged weights and their model config, from an average artifact."""
    return load_averaged(artifact.file("weights.pt"), artifact.file("average.json"))
