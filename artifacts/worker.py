"""The one torchrun worker entry of the pipeline: every rank of a stage that runs on several processes.

A stage with ``nproc > 1`` calls :func:`launch_stage` from its ``build``; torchrun then starts
``python -m artifacts.worker`` on every rank, which rebuilds the stage's config and input artifacts and calls the
same ``build`` with ``LOCAL_RANK`` set (the stage then does its rank's share: train, score). The launching
process files what the ranks wrote and commits the artifact, as for one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from runtime.launch import die_with_launcher, run_workers

from .configs import config_from_dict
from .runner import Stage, StageContext
from .store import MANIFEST, Artifact


def launch_stage(stage: Stage, cfg: Any, inputs: Mapping[str, Artifact], ctx: StageContext, nproc: int) -> list[str]:
    """Run ``stage.build`` on ``nproc`` ranks under torchrun and wait; the command, for the artifact's records."""
    args = ["--stage-module", stage.module, "--key", ctx.key, "--dir", str(ctx.dir), "--work", str(ctx.work),
            "--config-json", json.dumps(dataclasses.asdict(cfg))]
    args += [f"--input={role}={inputs[role].path}" for role in stage.inputs]
    return run_workers("artifacts.worker", nproc, args)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m artifacts.worker", description="One rank of a stage under torchrun.")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--stage-module", required=True, help="the module that defines STAGE, e.g. stages.train")
    p.add_argument("--key", required=True)
    p.add_argument("--dir", type=Path, required=True, help="the artifact's (temporary) directory")
    p.add_argument("--work", type=Path, required=True, help="the key's resumable scratch")
    p.add_argument("--config-json", required=True)
    p.add_argument("--input", action="append", default=[], help="ROLE=ARTIFACT_DIR")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stage: Stage = importlib.import_module(a.stage_module).STAGE  # found by name: the store knows no stage
    inputs = {}
    for item in a.input:
        role, _, path = item.partition("=")
        inputs[role] = Artifact(Path(path), json.loads((Path(path) / MANIFEST).read_text()))
    cfg = config_from_dict(stage.config, json.loads(a.config_json), stage.name)
    stage.build(cfg, inputs, StageContext(key=a.key, dir=a.dir, work=a.work))
    # the rank's results are on disk: leave without running destructors, since torch.distributed's can deadlock
    # at exit (gpt.training.KEEP_UNTIL_EXIT says how)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    die_with_launcher()  # first thing: this rank dies with torchrun
    main(sys.argv[1:])
