"""The DAG: which stages run, in which order, and which upstream artifacts each one reads.

The Prefect flow (``flows.pipeline``) and the plain runner below walk the same list, so a run with or
without Prefect produces the same keys and artifacts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Mapping, TypeVar

from artifacts import ArtifactStore, Stage, StageResult, run_stage
from stages import average, compliance, evaluate, quantize, tokenize, train

from .config import PipelineConfig

R = TypeVar("R")

# Input roles are the names of the upstream stages whose artifacts a stage reads.
STAGES: tuple[Stage, ...] = (tokenize.STAGE, train.STAGE, average.STAGE, quantize.STAGE, evaluate.STAGE,
                             compliance.STAGE)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def stage_config(cfg: PipelineConfig, name: str):
    return getattr(cfg, name)


def check_stage_names(names: Iterable[str]) -> list[str]:
    from .config import ConfigError
    names = list(names)
    if "all" in names:
        return [s.name for s in STAGES]
    bad = [n for n in names if n not in STAGE_BY_NAME]
    if bad:
        raise ConfigError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGE_BY_NAME)}")
    return names


def stages_until(until: str | None = None) -> list[str]:
    """The stage names in DAG order, stopping after ``until`` (None or 'all': every stage); a typo is refused."""
    names = [s.name for s in STAGES]
    if until in (None, "", "all"):
        return names
    check_stage_names([until])
    return names[:names.index(until) + 1]


def preflight(cfg: PipelineConfig) -> None:
    """Catch what can be caught before anything runs: missing source documents or tokenizer files."""
    from artifacts import plan_key
    plan_key(tokenize.STAGE, cfg.tokenize, {})


def ship_eval(configs: Mapping[str, object]) -> dict[str, object]:
    """The quantize config given the eval config that train_gpt.py embeds (when both stages run): the shipped
    program scores with the run's eval settings, so the code bytes quantize counts depend on them. The eval's
    process count is left out: train_gpt.py takes it from torchrun."""
    if "quantize" not in configs or "eval" not in configs:
        return dict(configs)
    ev = {k: v for k, v in dataclasses.asdict(configs["eval"]).items() if k != "nproc"}
    quantize = dataclasses.replace(configs["quantize"], ship_eval=json.dumps(ev, sort_keys=True))
    return {**configs, "quantize": quantize}


def run_sequence(names: Iterable[str], configs: Mapping[str, object], keys: dict[str, str],
                 run_one: Callable[[Stage, object, dict[str, str]], tuple[str, R]]) -> list[R]:
    """The one stage-sequence runner: ``names`` in DAG order, each given the keys of its inputs from ``keys``
    (upstream keys given by the caller, then each stage's own as it finishes). ``run_one(stage, config,
    input_keys)`` runs one stage (in this process, or as a Prefect task) and returns (its key, a result).
    The quantize stage is given the eval's config to embed in train_gpt.py (``ship_eval``)."""
    configs = ship_eval(configs)
    out = []
    for name in names:
        stage = STAGE_BY_NAME[name]
        key, result = run_one(stage, configs[name], {role: keys[role] for role in stage.inputs})
        keys[name] = key
        out.append(result)
    return out


def run_pipeline(cfg: PipelineConfig, store: ArtifactStore, force: Iterable[str] = (),
                 until: str | None = None,
                 on_result: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run the DAG in this process without Prefect; each stage is served from the store when it can be."""
    force = set(check_stage_names(force))

    def run_one(stage: Stage, stage_cfg, input_keys: dict[str, str]) -> tuple[str, StageResult]:
        inputs = {role: store.get(key) for role, key in input_keys.items()}
        res = run_stage(stage, stage_cfg, inputs, store, force=stage.name in force)
        if on_result:
            on_result(res)
        return res.artifact.key, res

    names = stages_until(until)
    return run_sequence(names, {n: stage_config(cfg, n) for n in names}, {}, run_one)
