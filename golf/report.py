"""``golf report KEY [KEY ...]``: one self-contained HTML page of runs read from the store.

Each key (a compliance, eval or train key, or a unique prefix of one) is a run: its lineage is walked through
the manifests' input keys, so a compliance key brings every stage, an eval key all but compliance, a train
key only training. Several keys overlay their curves and fill the seeds table; ``--against`` adds the
challenge's one-sided Welch test against a baseline set (golf/submit.py's, the same as ``golf compare``).
Nothing is recomputed: the page is the artifacts' files drawn (reporting/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from artifacts import Artifact, ArtifactStore

REPORT_STAGES = ("compliance", "eval", "train")


class ReportError(ValueError):
    """A key that cannot head a report (the key and the reason are named)."""


def lineage(store: ArtifactStore, key: str) -> dict[str, Artifact]:
    """Stage name -> artifact for the run headed by ``key``: the artifact and its inputs, recursively (the first
    artifact of each stage met, nearest first). An input missing from the store is left out (its section says so)."""
    head = store.get(store.resolve(key))
    if head.stage not in REPORT_STAGES:
        raise ReportError(f"{head.key} is a {head.stage} artifact; give a compliance, eval or train key")
    out: dict[str, Artifact] = {}
    todo = [head]
    while todo:
        art = todo.pop(0)
        if art.stage in out:
            continue
        out[art.stage] = art
        for input_key in art.manifest.get("inputs", {}).values():
            if store.exists(input_key):
                todo.append(store.get(input_key))
    return out


def comparison(store: ArtifactStore, keys: Sequence[str], against: Sequence[str]) -> dict | None:
    """The Welch test of the runs against the baseline keys, as the seeds section shows it; None without a baseline.
    A test that cannot be made (train keys, fewer than 2 runs a side) is reported on the page, not raised."""
    if not against:
        return None
    from .submit import SubmitError, compare_runs, format_comparison, resolve_run
    baseline = [resolve_run(store, k) for k in against]  # a bad baseline key is the user's error: raised
    values = [(f"seed {r.seed}", r.val_bpb) for r in baseline]
    try:
        test = compare_runs([resolve_run(store, k) for k in keys], baseline)
    except SubmitError as e:
        return {"error": f"no Welch test: {e}", "baseline": values}
    return {"text": format_comparison(test), "baseline": values}


def build_report(store: ArtifactStore, keys: Sequence[str], against: Sequence[str] = ()) -> str:
    """The page's HTML for the runs headed by ``keys``."""
    from reporting.build import render_page, run_labels
    from reporting.data import load_run
    if not keys:
        raise ReportError("give at least one compliance, eval or train key")
    arts = [lineage(store, k) for k in keys]
    heads = [next(a[s].key for s in REPORT_STAGES if s in a) for a in arts]
    if len(set(heads)) < len(heads):
        raise ReportError(f"a run is given twice: {', '.join(sorted({h for h in heads if heads.count(h) > 1}))}")
    seeds = [a["train"].config.get("seed") if "train" in a else None for a in arts]
    labels = run_labels(heads, seeds)
    runs = [load_run(a, label) for a, label in zip(arts, labels)]
    return render_page(runs, comparison(store, heads, list(against)))


def write_report(store: ArtifactStore, keys: Sequence[str], out: Path, against: Sequence[str] = ()) -> Path:
    page = build_report(store, keys, against)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
