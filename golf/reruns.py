"""Partial runs from an artifact already in the store, and the summary of a seeds sweep.

A quantize-only run starts from a train or average key; an eval-only run from a quantize key. The keys
of everything upstream (the tokenize and train artifacts that eval and compliance also read) come from
the manifests' ``inputs``, so the run reuses exactly the artifacts the given key was built from.

    golf deploy    (then run the quantize-only / eval-only / seeds deployments; flows/rerun.py, flows/seeds.py)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from artifacts import ArtifactStore

from .config import PipelineConfig
from .pipeline import STAGE_BY_NAME, STAGES
from .seed_stability import OUTLIER_BPB, flag_outliers
from .stats import mean_std
from .submit import compare_runs, format_comparison, resolve_run


class RerunError(ValueError):
    """A key that cannot start the requested partial run (the key and the reason are named)."""


def upstream_keys(store: ArtifactStore, key: str) -> dict[str, str]:
    """Stage name -> key for the artifact ``key`` and every artifact upstream of it, all present in the store."""
    out: dict[str, str] = {}
    for _, role, k in store.lineage(key):
        stage = store.get(k).stage  # raises ArtifactNotFound when an input was deleted from the store
        if role != "self" and role != stage:
            raise RerunError(f"{k} is a {stage} artifact but is recorded as the {role!r} input of a run")
        if out.setdefault(stage, k) != k:
            raise RerunError(f"the lineage of {key} holds two {stage} artifacts ({out[stage]} and {k})")
    return out


def start_from(store: ArtifactStore, key: str, allowed: Sequence[str], what: str) -> tuple[str, dict[str, str]]:
    """The stage of ``key`` (one of ``allowed``) and the keys upstream of it; a clear error otherwise."""
    if not key:
        raise RerunError(f"{what} needs an artifact key: one of {', '.join(allowed)} (see golf artifacts ls)")
    full = store.resolve(key)
    stage = store.get(full).stage
    if stage not in allowed:
        raise RerunError(f"{what} starts from a {' or '.join(allowed)} artifact; {full} is a {stage} artifact")
    keys = upstream_keys(store, full)
    missing = [r for name in keys for r in STAGE_BY_NAME[name].inputs if r not in keys]
    if missing:
        raise RerunError(f"{full}: its lineage lacks a {missing[0]} artifact")
    return stage, keys


def stages_after(stage: str, until: str | None = None) -> list[str]:
    """The stage names downstream of ``stage`` in DAG order, stopping after ``until`` when given."""
    names = [s.name for s in STAGES]
    after = names[names.index(stage) + 1:]
    if until is None:
        return after
    if until not in after:
        raise RerunError(f"until={until!r}: a run from a {stage} artifact can stop after one of {', '.join(after)}")
    return after[:after.index(until) + 1]


# --- seeds -------------------------------------------------------------------------------------------------
def with_seed(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


def check_seeds(seeds: Sequence[int], baseline_keys: Sequence[str], store: ArtifactStore) -> None:
    """Refuse a seeds sweep that could not end in its table, before any training starts."""
    if not seeds:
        raise RerunError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise RerunError(f"seeds repeat a value: {list(seeds)}")
    if baseline_keys:
        if len(baseline_keys) < 2:
            raise RerunError("baseline_keys: Welch's test needs at least 2 baseline runs (eval or compliance keys)")
        if len(seeds) < 2:
            raise RerunError("seeds: a comparison with the baseline needs at least 2 seeds")
        for k in baseline_keys:
            resolve_run(store, k)  # the key exists and is an eval or compliance artifact


def seeds_summary(store: ArtifactStore, keys: Sequence[str], baseline_keys: Sequence[str] = (),
                  threshold_nats: float = 0.005, alpha: float = 0.01, outlier_bpb: float = OUTLIER_BPB) -> dict:
    """Per-seed rows (val_loss, val_bpb, the TTT gain, bytes, verdict, an outlier flag naming the likely knob),
    mean and std, and the Welch test against a baseline."""
    runs = [resolve_run(store, k) for k in keys]
    rows = [{"seed": r.seed, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
             "no_ttt_val_bpb": r.eval.metrics.get("no_ttt_val_bpb"), "ttt_gain_bpb": r.eval.metrics.get("ttt_gain_bpb"),
             "artifact_bytes": r.quantize.metrics.get("artifact_bytes"),
             "compliance": r.compliance.metrics.get("verdict") if r.compliance else None, "key": r.key}
            for r in runs]
    rows = flag_outliers(rows, [r.eval.config.get("ttt") or {} for r in runs], outlier_bpb)
    loss, loss_sd = mean_std([r.val_loss for r in runs])
    bpb, bpb_sd = mean_std([r.val_bpb for r in runs])
    out = {"rows": rows, "mean_val_loss": loss, "std_val_loss": loss_sd, "mean_val_bpb": bpb, "std_val_bpb": bpb_sd,
           "comparison": None, "significant": None}
    if baseline_keys:
        c = compare_runs(runs, [resolve_run(store, k) for k in baseline_keys], threshold_nats, alpha)
        out["comparison"] = format_comparison(c)
        out["significant"] = c.significant
        out["p_value"] = c.test.p_value
    return out


def format_seeds(summary: dict) -> str:
    lines = [f"{'seed':>6}  {'val_loss':>10}  {'val_bpb':>10}  {'TTT gain':>9}  {'bytes':>12}  {'compliance':<10}  key"]
    for r in summary["rows"]:
        gain = "-" if r.get("ttt_gain_bpb") is None else f"{r['ttt_gain_bpb']:+.5f}"
        lines.append(f"{r['seed']:>6}  {r['val_loss']:>10.6f}  {r['val_bpb']:>10.6f}  {gain:>9}  "
                     f"{r['artifact_bytes'] or 0:>12,}  {r['compliance'] or '-':<10}  {r['key']}")
    lines.append(f"{'mean':>6}  {summary['mean_val_loss']:>10.6f}  {summary['mean_val_bpb']:>10.6f}")
    lines.append(f"{'std':>6}  {summary['std_val_loss']:>10.6f}  {summary['std_val_bpb']:>10.6f}")
    flagged = [r for r in summary["rows"] if r.get("outlier")]
    if flagged:
        lines += [""] + [f"seed {r['seed']}: {r['outlier']}" for r in flagged]
    if summary["comparison"]:
        lines += ["", summary["comparison"]]
    return "\n".join(lines)

