"""train: a GPT trained on the tokenize artifact's train shards under a wallclock cap.

Leaves the final weights, the EMA weights, the checkpoints that weight averaging needs (every
``swa_every`` steps during warmdown), a per-step metrics file and a loss-curve plot. A killed run
resumes from its last resume point when rerun with the same config (the manifest says so). While it
runs, each step's record is appended to ``metrics.live.jsonl`` in the store's work directory for the
stage (``golf-store/work/train-KEY/``), so a long or killed run can be looked at before it ends.

The loop itself is the core's (``gpt.training``); this stage gives it the tokenize artifact's train shards,
launches torchrun when ``nproc > 1`` and files what it wrote.

Run it alone (one process):     golf stage train --input tokenize=KEY
On 8 GPUs (the stage launches torchrun itself when nproc > 1):
                                golf stage train --input tokenize=KEY --set nproc=8
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Mapping

from artifacts import Artifact, Stage, StageContext
from artifacts.worker import launch_stage
from gpt.training import TrainConfig, train
from tokenizing.dataset import Dataset
from tokenizing.published import place

log = logging.getLogger("golf.train")


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


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy across file systems) the files of ``src`` into ``dst``: unlike a move, a failure
    before the artifact is committed leaves ``src`` whole for the rerun that resumes."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        place(f, dst / f.name, link=True)


def build(cfg: TrainConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    ds = Dataset.open(inputs["tokenize"])
    if "LOCAL_RANK" in os.environ:  # one rank of the torchrun job below (artifacts.worker): train, nothing else
        return train(cfg, ds.shard_paths("train"), ds.vocab_size, ctx.dir, ctx.work)
    resumed = (ctx.work / "resume.pt").exists()
    if cfg.nproc > 1:
        command = launch_stage(STAGE, cfg, inputs, ctx, cfg.nproc)
        metrics = json.loads((ctx.dir / "train.json").read_text())
    else:
        command = sys.argv
        metrics = train(cfg, ds.shard_paths("train"), ds.vocab_size, ctx.dir, ctx.work)
    (ctx.dir / "launch.txt").write_text(" ".join(command) + "\n")
    link_tree(ctx.work / "checkpoints", ctx.dir / "checkpoints")  # work/ keeps them until the commit
    plot_loss([json.loads(line) for line in (ctx.dir / "metrics.jsonl").read_text().splitlines()],
              ctx.dir / "loss_curve.png")
    if resumed or metrics.get("resumed_from_step") is not None:
        ctx.manifest_extra["resumed"] = {"from_step": metrics.get("resumed_from_step")}
    metrics.pop("checkpoints", None)
    metrics.pop("model_config", None)
    return metrics


STAGE = Stage(name="train", config=TrainConfig, inputs=("tokenize",), build=build, module=__name__,
              headline=("final_train_loss", "steps"))
