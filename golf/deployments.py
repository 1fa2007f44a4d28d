"""The Prefect deployments of prefect.yaml, created on a server (``golf deploy``) or served from here (``golf serve``).

prefect.yaml is the one list of deployments (name, entrypoint, description, tags); ``prefect deploy --all``
reads it as well. golf adds what a competitor wants on top: the deployments' default parameters taken
from a preset (``--preset record``) and the store path, the work pool created when missing, and each
config field's comment as its description in the Prefect UI's form.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    golf --store /data/golf-store deploy --pool golf --preset record
    prefect worker start --pool golf
"""

from __future__ import annotations

import dataclasses
import io
import json
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .defaults import DEFAULT_POOL, PREFECT_FILE  # noqa: F401  (defined there for the CLI's parser, torch-free)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DeployError(ValueError):
    """A deployment that cannot be created or served (the deployment, file or setting is named)."""


@dataclass(frozen=True)
class DeploymentSpec:
    name: str                 # the deployment's name: runs are 'FLOW-NAME/NAME'
    entrypoint: str           # path/to/file.py:flow_function, relative to the project root
    description: str = ""
    tags: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict)  # defaults over the preset's (prefect.yaml's 'parameters')

    @property
    def path(self) -> str:
        return self.entrypoint.rpartition(":")[0]


def load_specs(prefect_file: Path = PREFECT_FILE) -> list[DeploymentSpec]:
    import yaml
    try:
        doc = yaml.safe_load(Path(prefect_file).read_text())
    except FileNotFoundError:
        raise DeployError(f"{prefect_file}: no such file (the deployments are listed there)") from None
    specs = []
    for i, d in enumerate((doc or {}).get("deployments") or []):
        if not d.get("name") or ":" not in str(d.get("entrypoint", "")):
            raise DeployError(f"{prefect_file}: deployment #{i + 1} needs a name and an entrypoint 'file.py:flow'")
        specs.append(DeploymentSpec(d["name"], d["entrypoint"], d.get("description") or "", tuple(d.get("tags") or ()),
                                    d.get("parameters") or {}))
    if not specs:
        raise DeployError(f"{prefect_file}: no deployments")
    return specs


def select(specs: list[DeploymentSpec], only: list[str] | None) -> list[DeploymentSpec]:
    if not only:
        return specs
    names = {s.name for s in specs}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise DeployError(f"no deployment {unknown[0]!r} in prefect.yaml; deployments: {', '.join(sorted(names))}")
    return [s for s in specs if s.name in only]


# --- parameters --------------------------------------------------------------------------------------------
def preset_parameters(fn, cfg: PipelineConfig | None, store_root: str | None) -> dict[str, Any]:
    """Default parameters of one flow from a preset: ``config`` gets the whole config, a parameter named after a
    stage (quantize, eval, ...) gets that stage's section, ``store_root`` the store path."""
    import inspect
    out: dict[str, Any] = {}
    for name in inspect.signature(fn).parameters:
        if name == "store_root" and store_root:
            out[name] = store_root
        elif cfg is not None and name == "config":
            out[name] = dataclasses.asdict(cfg)
        elif cfg is not None and name == "quantize_configs":  # the sweep: one entry to start the list from
            out[name] = [dataclasses.asdict(cfg.quantize)]
        elif cfg is not None and name in {f.name for f in dataclasses.fields(PipelineConfig)}:
            out[name] = dataclasses.asdict(getattr(cfg, name))
    return out


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of a config dataclass: what the field is and when to change it."""
    import inspect
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, line_name = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = tok.start
        if tok.type == tokenize.NAME and row not in line_name and col > 0 and tok.line[:col].strip() == "":
            line_name[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_name:
            out.setdefault(line_name[row], tok.string.lstrip("#").strip())
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in out.items() if k in fields}


def config_classes(cls: type = PipelineConfig) -> dict[str, type]:
    """Every config dataclass reachable from ``cls``, by class name (the schema's definitions use these names)."""
    out = {cls.__name__: cls}
    for f, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            out.update(config_classes(kind))
    return out


def describe_schema(schema: dict) -> dict:
    """Add each config field's comment as its description in a parameter schema's definitions (in place)."""
    classes = config_classes()
    for name, definition in (schema.get("definitions") or {}).items():
        cls = classes.get(name)
        if cls is None:
            continue
        for field_name, text in field_comments(cls).items():
            prop = definition.get("properties", {}).get(field_name)
            if prop is not None and "description" not in prop:
                prop["description"] = text
    return schema


# --- building the deployments ------------------------------------------------------------------------------
def _check_server() -> str:
    from prefect.settings import PREFECT_API_URL
    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("no Prefect server: start one (prefect server start) and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def build(specs: list[DeploymentSpec], preset_cfg: PipelineConfig | None, store_root: str | None,
          project_dir: str | None = None, job_variables: dict | None = None,
          local_root: Path = PROJECT_ROOT) -> tuple[list, list[str]]:
    """RunnerDeployments for ``specs`` (flows loaded from ``local_root``; workers run them from ``project_dir``),
    and one line per deployment skipped because its flow file is absent from this checkout."""
    from prefect import Flow
    from prefect.runner.storage import LocalStorage

    deployments, skipped = [], []
    for spec in specs:
        if not (local_root / spec.path).is_file():
            skipped.append(f"{spec.name}: {spec.path} is not in this checkout")
            continue
        flow = Flow.from_source(source=str(local_root), entrypoint=spec.entrypoint)
        params = {**preset_parameters(flow.fn, preset_cfg, store_root), **spec.parameters}
        dep = flow.to_deployment(name=spec.name, description=spec.description or None, tags=list(spec.tags),
                                 parameters=params, job_variables=job_variables or None)
        if project_dir:  # the workers' copy of the project (an image's /opt/golf), not necessarily this one
            dep.storage = LocalStorage(project_dir)
        # the form's nested fields: Prefect keeps the schema on a private attribute; its definitions are edited in place
        describe_schema({"definitions": dep._parameter_openapi_schema.definitions})
        deployments.append(dep)
    return deployments, skipped


def ensure_pool(pool: str, pool_type: str) -> bool:
    """Create the work pool when it does not exist (process pools only: others need their worker's plugin).
    Returns whether it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            existing = None
        if existing is not None:
            return False
        if pool_type != "process":
            raise DeployError(f"work pool {pool!r} does not exist: create it first "
                              f"(prefect work-pool create {pool} --type {pool_type})")
        from prefect.workers.process import ProcessWorker
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        return True


def deploy(specs: list[DeploymentSpec], pool: str = DEFAULT_POOL, pool_type: str = "process",
           preset_cfg: PipelineConfig | None = None, store_root: str | None = None, project_dir: str | None = None,
           image: str | None = None, job_variables: dict | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Create or update the deployments on the configured server. Returns (flow/deployment name, id) pairs and
    the skipped deployments."""
    _check_server()
    created_pool = ensure_pool(pool, pool_type)
    deployments, skipped = build(specs, preset_cfg, store_root, project_dir, job_variables)
    out = []
    for dep in deployments:
        dep_id = dep.apply(work_pool_name=pool, image=image)
        out.append((f"{dep.flow_name}/{dep.name}", str(dep_id)))
    if created_pool:
        skipped.insert(0, f"(created work pool {pool!r}, type process)")
    return out, skipped


def serve(specs: list[DeploymentSpec], preset_cfg: PipelineConfig | None = None, store_root: str | None = None,
          limit: int | None = None) -> None:
    """Serve the deployments from this process until interrupted: each run is a subprocess of this one."""
    _check_server()
    from prefect import serve as prefect_serve
    deployments, skipped = build(specs, preset_cfg, store_root)
    for line in skipped:
        print(f"skipped {line}")
    prefect_serve(*deployments, limit=limit)


def parse_job_variables(text: str | None) -> dict | None:
    """``--job-variables '{"volumes": [...]}'``: a JSON object of the work pool's job variables."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeployError(f"--job-variables is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise DeployError("--job-variables must be a JSON object, e.g. '{\"volumes\": [\"/mnt/store:/store\"]}'")
    return value


def preset_or_none(name: str | None) -> PipelineConfig | None:
    if name is None:
        return None
    from .config import preset
    return preset(name)

