"""The Prefect flow: one task per stage, wired like ``golf.pipeline.STAGES``.

A task is a cache hit exactly when its artifact key is complete in the store (the store is the
source of truth, not Prefect's database); tasks return small manifests, never tensors, and publish a
table artifact with the stage's key, files and metrics for the Prefect UI.

    golf run --preset tiny
"""

from __future__ import annotations

import dataclasses

from golf.prefect_env import configure_prefect

configure_prefect()

from prefect import flow, task  # noqa: E402  (the environment must be set before prefect is imported)
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from artifacts import ArtifactStore, run_stage  # noqa: E402
from artifacts.store import default_root  # noqa: E402
from golf.config import DEFAULT_PRESET, PipelineConfig, config_from_dict, preset  # noqa: E402
from golf.pipeline import STAGE_BY_NAME, check_stage_names, run_sequence, stages_until  # noqa: E402


DEFAULT_CONFIG = preset(DEFAULT_PRESET)  # what a deployment's form shows until `golf deploy --preset` sets another


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


@task(cache_policy=NO_CACHE, task_run_name="{stage_name}")
def stage_task(stage_name: str, config: dict, input_keys: dict[str, str], store_root: str,
               force: bool = False) -> dict:
    """Build (or fetch from the store) one stage's artifact and return its manifest summary."""
    stage = STAGE_BY_NAME[stage_name]
    store = ArtifactStore(store_root)
    inputs = {role: store.get(key) for role, key in input_keys.items()}
    res = run_stage(stage, config_from_dict(stage.config, config, stage_name), inputs, store, force=force)
    summary = res.summary()
    rows = [{"field": "key", "value": res.artifact.key},
            {"field": "status", "value": "cached" if res.cached else "built"},
            {"field": "seconds", "value": f"{res.artifact.manifest.get('duration_s', 0):.1f}"},
            {"field": "bytes on disk", "value": f"{res.artifact.total_bytes:,}"}]
    rows += [{"field": k, "value": str(v)} for k, v in res.artifact.metrics.items() if not isinstance(v, (dict, list))]
    create_table_artifact(key=_slug(f"golf-{stage_name}"), table=rows,
                          description=f"{stage_name} artifact {res.artifact.key}")
    if stage_name == "compliance":
        report = res.artifact.file("report.md").read_text()
        create_markdown_artifact(key="golf-compliance-report", markdown=report,
                                 description=f"compliance {res.artifact.metrics.get('verdict')}")
        link_run_report(res.artifact)
    return summary


def link_run_report(artifact) -> None:
    """A link artifact to the compliance artifact's report.html (the run's page: `golf report`), when it has one.
    A file:// link: the page lives in the store, which the UI's browser may or may not reach, so the path is
    also the link's text."""
    if "report.html" not in artifact.manifest.get("files", {}):
        return
    page = artifact.file("report.html").resolve()
    create_link_artifact(key="golf-run-report", link=page.as_uri(), link_text=str(page),
                         description=f"the run's report page ({artifact.key}); `golf report {artifact.key} OTHER_KEYS` "
                                     f"draws it again beside other runs")


def run_stages(names: list[str], configs: dict[str, object], keys: dict[str, str], store_root: str,
               force: list[str] | None = None) -> list[dict]:
    """Run ``names`` in DAG order as stage tasks (golf.pipeline.run_sequence), each reading its inputs from
    ``keys`` (which grows as stages finish), each config from ``configs`` (stage name -> config dataclass);
    print one line per stage."""
    forced = set(check_stage_names(force or []))

    def run_one(stage, cfg, input_keys: dict[str, str]) -> tuple[str, dict]:
        s = stage_task(stage.name, dataclasses.asdict(cfg), input_keys, store_root, stage.name in forced)
        print(f"{stage.name:<10} {'cached' if s['cached'] else 'built ':<6} {s['key']}")
        return s["key"], s

    return run_sequence(names, configs, keys, run_one)


@flow(name="golf-pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig = DEFAULT_CONFIG, store_root: str = "", force: list[str] | None = None,
                  until: str | None = None) -> list[dict]:
    """The whole pipeline on one config: tokenize, train, average, quantize, eval, compliance.

    Args:
        config: every stage's settings (a dict is accepted too; unknown keys are refused)
        store_root: the artifact store, shared by every worker ('' = $GOLF_STORE, else ./golf-store)
        force: stages to rebuild even when cached ('all' for every stage)
        until: stop after this stage
    """
    if isinstance(config, dict):  # called directly, not through Prefect's parameter validation
        config = config_from_dict(PipelineConfig, config)
    store_root = store_root or str(default_root())
    names = stages_until(until)
    configs = {name: getattr(config, name) for name in names}
    return run_stages(names, configs, {}, store_root, force)
