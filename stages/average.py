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
from typing import Mapping

import torch

from artifacts import Artifact, Stage, StageContext
from gpt.averaging import METHODS, AverageConfig, average_run, load_averaged  # noqa: F401  (the stage's config)
from gpt.devices import resolve_device
from gpt.model import ModelConfig
from gpt.training import TrainConfig
from tokenizing.dataset import Dataset

log = logging.getLogger("golf.average")


def train_config(train_art: Artifact) -> dict:
    """The train config that made the weights, less the bookkeeping outside its key: average.json carries it so
    that the quantize stage can embed it in train_gpt.py (the program reruns this training)."""
    return {k: v for k, v in train_art.config.items() if k not in TrainConfig.NOT_IN_KEY}


def build(cfg: AverageConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    train_art = inputs["train"]
    info = json.loads(train_art.file("train.json").read_text())
    model_cfg = ModelConfig(**info["model_config"])
    ema = train_art.file("ema.pt") if "ema.pt" in train_art.manifest["files"] else None
    ckpts = {n: train_art.file(n) for n in train_art.files("checkpoints/")}
    out = average_run(cfg, model_cfg, train_art.file("final.pt"), ema, ckpts,
                      Dataset.open(inputs["tokenize"]).shard_paths("train"), info["tokens"],
                      train_art.config["seq_len"], resolve_device(cfg.device, "average.device"))
    torch.save(out.state, ctx.dir / "weights.pt")
    report = {**out.report, "model_config": info["model_config"], "train_config": train_config(train_art)}
    (ctx.dir / "average.json").write_text(json.dumps(report, indent=2) + "\n")
    return out.metrics


STAGE = Stage(name="average", config=AverageConfig, inputs=("train", "tokenize"), build=build, module=__name__,
              headline=("heldout_loss",))


def load_weights(artifact: Artifact) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The averaged weights and their model config, from an average artifact."""
    return load_averaged(artifact.file("weights.pt"), artifact.file("average.json"))
