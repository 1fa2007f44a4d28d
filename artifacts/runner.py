"""Runs one stage against the store: key first, cache check, build in a temporary directory, commit.

A stage is declared once, in its own module, as a :class:`Stage`: a name, a frozen config dataclass,
the roles of its input artifacts, and a plain ``build(cfg, inputs, ctx) -> metrics`` function. Every
caller (the CLI, the Prefect flow, a test, torchrun) goes through :func:`run_stage`, so keys, locking,
manifests and logs behave the same everywhere.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .store import (Artifact, ArtifactCorrupt, ArtifactStore, StoreError, compute_key, file_problems, sha256_file,
                    utc_now, write_failure)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("stages", "gpt", "tokenizing", "shipping", "runtime", "reporting")  # a stage's digest covers the modules it imports from these
EXTERNAL_HASH_LIMIT = 512 << 20  # hash external inputs up to 512 MiB in total; larger: size + mtime

log = logging.getLogger("golf")


@dataclass
class StageContext:
    """What a running stage may touch: its output directory, its resumable scratch, its key."""

    key: str
    dir: Path           # the artifact's files go here (a temporary directory until commit)
    work: Path          # survives a crash of this key's build; deleted after commit
    manifest_extra: dict = field(default_factory=dict)  # extra manifest fields (e.g. "resumed")
    forced: bool = False  # the user asked for this stage to be built again (--force): reuse nothing of old artifacts


@dataclass(frozen=True)
class Stage:
    name: str
    config: type                     # a frozen dataclass
    inputs: tuple[str, ...]          # roles of input artifacts (each the name of an upstream stage)
    build: Callable[[Any, Mapping[str, Artifact], StageContext], dict]
    module: str                      # the module that defines it: the root of its code digest
    external: Callable[[Any], Mapping[str, Path]] | None = None  # files outside the store it reads
    headline: tuple[str, ...] = ()   # the metrics that summarise an artifact in one line (golf run, artifacts ls)


def headline_metric(fields: tuple[str, ...], metrics: dict) -> str:
    parts = []
    for name in fields:
        if name in metrics:
            v = metrics[name]
            parts.append(f"{name}={v:.4f}" if isinstance(v, float) else f"{name}={v}")
    return " ".join(parts)


# --- code digest ------------------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


_IMPORTS: dict[tuple, set[str]] = {}  # (path, module, mtime, size) -> its imports: each file parsed once per process


def _imports(path: Path, module: str) -> set[str]:
    st = path.stat()
    key = (str(path), module, st.st_mtime_ns, st.st_size)
    if key not in _IMPORTS:
        _IMPORTS[key] = _parse_imports(path, module)
    return _IMPORTS[key]


def _parse_imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def code_files(module: str) -> dict[str, Path]:
    """The stage module and every module of the project's code packages it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in CODE_PACKAGES:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imports(path, name))
        if "." in name:  # a package's __init__ runs whenever one of its modules is imported
            todo.append(name.rpartition(".")[0])
    return dict(sorted(seen.items()))


# CPython 3.11's AST constructor is not thread-safe (stages run in task threads, and Prefect parses too): parse
# under a lock, once per file version (_IMPORTS), and let flows that map stages over threads warm this first.
# One lock for every parse in the project (shipping.assemble's minifier takes it too).
AST_LOCK = threading.RLock()


def code_digest(module: str) -> tuple[str, dict[str, str]]:
    with AST_LOCK:
        files = code_files(module)
    per_file = {name: sha256_file(path)[:16] for name, path in files.items()}
    digest = hashlib.sha256("".join(f"{n}:{d};" for n, d in per_file.items()).encode()).hexdigest()
    return digest[:20], per_file


def fingerprint_external(paths: Mapping[str, Path]) -> dict[str, str]:
    """Content hashes of a stage's files outside the store (size + mtime above the hash limit)."""
    out = {}
    for role, p in sorted(paths.items()):
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        if not files or not all(f.exists() for f in files):
            raise StoreError(f"{role}: input {p} does not exist")
        total = sum(f.stat().st_size for f in files)
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            if total <= EXTERNAL_HASH_LIMIT:
                h.update(sha256_file(f).encode())
            else:
                st = f.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        out[role] = h.hexdigest()[:20]
    return out


# --- environment ------------------------------------------------------------------------------
def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "host": socket.gethostname(), "cpu_count": os.cpu_count(),
           "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    try:
        import torch
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu_count"] = torch.cuda.device_count()
            env["gpu_name"] = torch.cuda.get_device_name(0)
        else:
            env["gpu_count"] = 0
            env["gpu_name"] = None
    except ImportError:
        pass
    return env


# --- running ------------------------------------------------------------------------------------
@dataclass
class StageResult:
    artifact: Artifact
    cached: bool
    seconds: float  # wall time of this call (near zero for a cache hit)

    def summary(self) -> dict:
        """The small dict that tasks return: never tensors."""
        return {"stage": self.artifact.stage, "key": self.artifact.key, "cached": self.cached,
                "seconds": round(self.seconds, 3), "metrics": self.artifact.metrics,
                "headline": self.artifact.manifest.get("headline", ""), "path": str(self.artifact.path)}


def config_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def plan_key(stage: Stage, cfg: Any, inputs: Mapping[str, Artifact]) -> tuple[str, dict]:
    """The key and the identity fields of the manifest, before anything runs."""
    missing = set(stage.inputs) - set(inputs)
    if missing:
        raise StoreError(f"stage {stage.name} needs input artifacts: {', '.join(sorted(missing))}")
    digest, per_file = code_digest(stage.module)
    external = fingerprint_external(stage.external(cfg)) if stage.external else {}
    input_keys = {role: inputs[role].key for role in stage.inputs}
    # an input is named by its key and what it holds: a forced rebuild of an input re-keys this stage
    input_content = {role: inputs[role].content_digest for role in stage.inputs}
    # fields a config marks as not affecting the result (process counts, logging cadence) stay out of the key
    keyed = {k: v for k, v in config_dict(cfg).items() if k not in getattr(stage.config, "NOT_IN_KEY", ())}
    key = compute_key(stage.name, keyed, digest, {r: f"{k}@{input_content[r]}" for r, k in input_keys.items()},
                      external)
    identity = {"stage": stage.name, "config": config_dict(cfg), "code_digest": digest,
                "code_files": per_file, "inputs": input_keys, "input_content": input_content,
                "external_inputs": external}
    return key, identity


# (file path, inode, size, mtime) of input files already re-hashed against their manifests in this process: each
# input file is hashed once per process however many stages read it (a pipeline reads tokenize's shards five times)
_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()


def _stat_id(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def verify_inputs(inputs: Mapping[str, Artifact]) -> None:
    """Re-hash every file of the input artifacts against their manifests before a stage reads them.

    A corrupted input (a flipped byte on disk, an edited hard-linked shard) is refused with the artifact and
    the file named, instead of being trained on, scored or shipped."""
    for role, art in sorted(inputs.items()):
        listed = art.manifest.get("files", {})
        todo = {}
        for name, meta in listed.items():
            try:
                sid = _stat_id(art.path / name)
            except FileNotFoundError:
                todo[name] = meta
                continue
            with _VERIFIED_LOCK:
                if sid not in _VERIFIED:
                    todo[name] = meta
        problems = file_problems(art.path, todo)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ArtifactCorrupt(f"input artifact {art.key} ({role}) fails verification: {problems[0]}{more}; "
                                  f"see `golf artifacts verify {art.key}`, rebuild it with --force {art.stage}")
        with _VERIFIED_LOCK:
            for name in todo:
                with contextlib.suppress(FileNotFoundError):
                    _VERIFIED.add(_stat_id(art.path / name))


# The build whose log.txt a log record belongs to. Stages run concurrently in threads of one process (the quantize
# sweep), all logging to the shared "golf" logger: each artifact's handler keeps only its own build's records.
_BUILDING: contextvars.ContextVar[str | None] = contextvars.ContextVar("golf_building", default=None)


class _OnlyThisBuild(logging.Filter):
    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        return _BUILDING.get() == self.key


def run_stage(stage: Stage, cfg: Any, inputs: Mapping[str, Artifact], store: ArtifactStore,
              force: bool = False) -> StageResult:
    """Return the stage's artifact: from the store when its key exists, else built and committed."""
    t0 = time.perf_counter()
    key, identity = plan_key(stage, cfg, inputs)
    if not force and store.exists(key):
        return StageResult(store.get(key), True, time.perf_counter() - t0)
    with store.lock(key):
        if force:
            store.remove(key)
        elif store.exists(key):  # another process built it while we waited for the lock
            return StageResult(store.get(key), True, time.perf_counter() - t0)
        verify_inputs(inputs)
        pending = store.begin(key)
        ctx = StageContext(key=key, dir=pending.path, work=store.work_dir(key), forced=force)
        handler = logging.FileHandler(pending.path / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        handler.addFilter(_OnlyThisBuild(key))
        if log.getEffectiveLevel() > logging.INFO:  # the artifact's log keeps INFO even when the console does not
            log.setLevel(logging.INFO)
        log.addHandler(handler)
        building = _BUILDING.set(key)
        started, t_build = utc_now(), time.perf_counter()
        log.info("stage %s: building %s", stage.name, key)
        try:
            metrics = stage.build(cfg, inputs, ctx) or {}
        except BaseException as e:
            _BUILDING.reset(building)
            log.removeHandler(handler)
            handler.close()
            failed = write_failure(e, probe=(pending.path, ctx.work))  # the disk refused: probed before the cleanup
            store.abort(pending)  # nothing half-written stays behind; work/ keeps resumable state
            if failed is not None and failed is not e:
                raise failed from e
            raise
        duration = time.perf_counter() - t_build
        log.info("stage %s: done in %.1f s", stage.name, duration)
        _BUILDING.reset(building)
        log.removeHandler(handler)
        handler.close()
        manifest = {
            **identity, "git": git_state(), "metrics": metrics, "headline": headline_metric(stage.headline, metrics),
            "environment": environment(),
            "started_at": started, "finished_at": utc_now(), "duration_s": round(duration, 3),
            "argv": sys.argv, **ctx.manifest_extra,
        }
        artifact = store.commit(pending, manifest)
        shutil.rmtree(ctx.work, ignore_errors=True)
    return StageResult(artifact, False, time.perf_counter() - t0)
