"""The versioned artifact store: content-keyed directories with a manifest written last.

Layout under the store root (``--store``, ``$GOLF_STORE``, default ``./golf-store``)::

    objects/<stage>-<hash>/manifest.json + files   complete artifacts (the source of truth)
    tmp/<key>.<pid>.<nonce>/                       artifacts being built (never read)
    work/<key>/                                    a stage's resumable scratch (train checkpoints)
    locks/<key>.lock                               one builder per key at a time

An artifact exists only when ``objects/<key>/manifest.json`` exists: the manifest is written last,
inside the temporary directory, and the directory is renamed into place in one step. When two
builders race for the same key the first rename wins and the loser's copy is discarded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_ROOT = "golf-store"
ENV_ROOT = "GOLF_STORE"


class StoreError(Exception):
    """A problem with the store or one of its artifacts, worded for the user."""


class ArtifactNotFound(StoreError):
    pass


class ArtifactCorrupt(StoreError):
    pass


class StoreWriteError(OSError):
    """The disk refused a write into the store (full, read-only, quota, file size limit): what was written,
    where, and why, on one line (``golf`` prints it and exits with code 4). Partial files are gone by then."""

    def __str__(self) -> str:
        why = os.strerror(self.errno) if self.errno else (self.strerror or "write failed")
        return f"{why[:1].lower()}{why[1:]} writing {self.filename} (errno {self.errno})"


from gpt.diskio import DISK_ERRNOS, TORCH_WRITE_FAILED  # noqa: E402  (stdlib only: shared with the core's writes)
from gpt.diskio import disk_refusal as _disk_refusal  # noqa: E402


def write_failure(e: BaseException, path: Path | str | None = None, probe: tuple = (),
                  any_os_error: bool = False) -> StoreWriteError | None:
    """``e`` as a StoreWriteError naming ``path`` (else the file the error names, else the probed path on the
    full disk, else the first probe), or None when it is not the disk's doing. An OSError counts when its errno
    is a disk's (any errno with ``any_os_error``: the caller was only writing); torch.save's RuntimeError
    ("unexpected pos ...") when a probed filesystem is full or a probed file hit the size limit. Call it
    before removing partial files: they are what fills the disk."""
    if isinstance(e, StoreWriteError):
        return e
    probe = tuple(probe) or ((path,) if path else ())
    refusal = _disk_refusal(probe)
    if isinstance(e, OSError) and e.errno and (any_os_error or e.errno in DISK_ERRNOS):
        code = e.errno
    elif isinstance(e, RuntimeError) and refusal is not None and any(m in str(e) for m in TORCH_WRITE_FAILED):
        code = refusal[0]
    else:
        return None
    where = (path or (e.filename if isinstance(e, OSError) else None) or (refusal[1] if refusal else None)
             or (probe[0] if probe else "?"))
    return StoreWriteError(code, os.strerror(code), str(where))


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Any OSError in the block is a StoreWriteError (naming the file the error names, else ``path``)."""
    try:
        yield
    except OSError as e:
        failed = write_failure(e, getattr(e, "filename", None) or path, any_os_error=True)
        if failed is None or failed is e:
            raise
        raise failed from e


# A key is a stage name, a dash and hex digits; prefixes of keys are accepted too. Anything with a path separator
# or a leading dot is refused, so `golf artifacts path ../objects/x` cannot name a directory outside objects/.
KEY_PATTERN = re.compile(r"(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Files whose bytes say how a build went, not what it made: left out of an artifact's content digest, so a
# rebuild that made the same outputs (a deterministic CPU run) does not re-key everything downstream.
NOT_CONTENT = frozenset({"log.txt"})


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that keys are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def compute_key(stage: str, config: dict, code_digest: str, inputs: dict[str, str],
                external: dict[str, str] | None = None) -> str:
    """The artifact key, known before the stage runs.

    It changes exactly when the stage name, any config field, the stage's code, an input artifact's key
    or the fingerprint of an external input (source documents, a tokenizer file) changes.
    """
    payload = canonical_json({
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "config": config,
        "code": code_digest,
        "inputs": dict(sorted(inputs.items())),
        "external": dict(sorted((external or {}).items())),
    })
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Artifact:
    """A complete artifact: its directory and its parsed manifest."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def file(self, name: str) -> Path:
        """Path of one output file, with a clear error if the manifest does not list it."""
        if name not in self.manifest.get("files", {}):
            raise ArtifactCorrupt(f"artifact {self.key} has no file {name!r} "
                                  f"(it has: {', '.join(sorted(self.manifest.get('files', {}))) or 'none'})")
        p = self.path / name
        if not p.exists():
            raise ArtifactCorrupt(f"artifact {self.key} lists {name!r} but the file is missing at {p}")
        return p

    def files(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.manifest.get("files", {}) if n.startswith(prefix))

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest.get("files", {}).values())

    @property
    def content_digest(self) -> str:
        """A hash of what the artifact holds (every output file's sha256, from the manifest).

        Downstream keys include it beside the key: a rebuild of the same key (``--force``) that made other
        weights gives every stage that reads them a new key, so nothing is served from the old weights."""
        files = {n: f["sha256"] for n, f in self.manifest.get("files", {}).items() if n not in NOT_CONTENT}
        return hashlib.sha256(canonical_json(files).encode()).hexdigest()[:16]


def file_problems(root: Path, listed: dict, hashed: bool = True) -> list[str]:
    """What is wrong with the files a manifest lists under ``root``: missing, other size, other sha256.

    With ``hashed`` False only presence and size are checked (cheap: for listings). Files are hashed on
    several threads (hashlib releases the GIL on large buffers), largest first."""
    problems, to_hash = [], []
    for name, meta in sorted(listed.items()):
        p = root / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != meta["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {meta['bytes']}")
        elif hashed:
            to_hash.append((size, name, p, meta["sha256"]))
    if to_hash:
        to_hash.sort(reverse=True)
        with ThreadPoolExecutor(max_workers=min(8, len(to_hash), os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda t: sha256_file(t[2]), to_hash))
        for (_, name, _, want), got in zip(to_hash, digests):
            if got != want:
                problems.append(f"{name}: sha256 {got[:12]}…, manifest says {want[:12]}…")
    return sorted(problems)


@dataclass
class PendingArtifact:
    """An artifact under construction in a temporary directory; becomes an Artifact on commit."""

    store: "ArtifactStore"
    key: str
    path: Path


class ArtifactStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.root = self.root.resolve()

    # --- layout -------------------------------------------------------------------------------
    @property
    def objects(self) -> Path:
        return self.root / "objects"

    def path_of(self, key: str) -> Path:
        return self.objects / key

    def work_dir(self, key: str) -> Path:
        """Scratch space that survives a crash (resumable checkpoints); removed after a commit."""
        p = self.root / "work" / key
        with writing(p):
            p.mkdir(parents=True, exist_ok=True)
        return p

    # --- reading ------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return (self.path_of(key) / MANIFEST).is_file()

    def get(self, key: str) -> Artifact:
        key = self.resolve(key)
        path = self.path_of(key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {key!r} in store {self.root}") from None
        except json.JSONDecodeError as e:
            raise ArtifactCorrupt(f"artifact {key}: manifest.json is not valid JSON ({e})") from None
        if manifest.get("key") != key:
            raise ArtifactCorrupt(f"artifact {key}: its manifest names key {manifest.get('key')!r}")
        return Artifact(path, manifest)

    def resolve(self, key_or_prefix: str) -> str:
        """Accept a full key or a unique prefix of one (as git does with commits)."""
        if not key_or_prefix:
            raise StoreError("give an artifact key or a unique prefix of one (see golf artifacts ls)")
        if not KEY_PATTERN.fullmatch(key_or_prefix):
            raise StoreError(f"{key_or_prefix!r} is not an artifact key (keys look like train-1a2b3c...; "
                             f"see golf artifacts ls)")
        if self.exists(key_or_prefix):
            return key_or_prefix
        matches = [a for a in self.keys() if a.startswith(key_or_prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ArtifactNotFound(f"no artifact {key_or_prefix!r} in store {self.root}")
        raise StoreError(f"{key_or_prefix!r} is ambiguous: {', '.join(sorted(matches)[:5])}")

    def keys(self) -> list[str]:
        if not self.objects.is_dir():
            return []
        return sorted(p.name for p in self.objects.iterdir() if (p / MANIFEST).is_file())

    def list(self) -> list[Artifact]:
        out = []
        for k in self.keys():
            with contextlib.suppress(StoreError):
                out.append(self.get(k))
        return sorted(out, key=lambda a: a.manifest.get("finished_at", ""))

    def broken(self) -> list[tuple[str, str]]:
        """(directory name, why) for each objects/ entry with a manifest that is not a valid artifact."""
        out = []
        for k in self.keys():
            try:
                self.get(k)
            except StoreError as e:
                out.append((k, str(e)))
        return out

    def incomplete(self) -> list[Path]:
        """Directories that are not artifacts: builds in progress or left by a crash."""
        tmp = self.root / "tmp"
        stray = [p for p in tmp.iterdir()] if tmp.is_dir() else []
        if self.objects.is_dir():
            stray += [p for p in self.objects.iterdir() if not (p / MANIFEST).is_file()]
        return sorted(stray)

    def verify(self, key: str) -> list[str]:
        """Re-hash every file of an artifact; return the problems found (empty when intact)."""
        art = self.get(key)
        listed = art.manifest.get("files", {})
        problems = file_problems(art.path, listed)
        for p in sorted(art.path.rglob("*")):
            rel = p.relative_to(art.path).as_posix()
            if p.is_file() and rel != MANIFEST and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
        return problems

    def lineage(self, key: str) -> list[tuple[int, str, str]]:
        """(depth, role, key) for the artifact and, recursively, its inputs."""
        out: list[tuple[int, str, str]] = []

        def walk(k: str, role: str, depth: int) -> None:
            out.append((depth, role, k))
            try:
                inputs = self.get(k).manifest.get("inputs", {})
            except StoreError:
                return
            for r, ik in sorted(inputs.items()):
                walk(ik, r, depth + 1)

        walk(self.resolve(key), "self", 0)
        return out

    # --- writing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the build lock of one key (an flock, released if the process dies)."""
        locks = self.root / "locks"
        with writing(locks):
            locks.mkdir(parents=True, exist_ok=True)
            fh = open(locks / f"{key}.lock", "w")
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def try_lock(self, key: str):
        """The build lock of ``key`` if nobody holds it (an open file to close to release it), else None."""
        locks = self.root / "locks"
        with writing(locks):
            locks.mkdir(parents=True, exist_ok=True)
            fh = open(locks / f"{key}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def sweep_tmp(self, building: str) -> list[Path]:
        """Remove what killed builds left in tmp/; call while holding the lock of ``building``.

        A temporary directory is ``<key>.<pid>.<nonce>``: one of ``building`` is a leftover (we hold its
        lock); one of another key is a leftover when that key's lock can be taken now. Builds in progress,
        in this process's other threads or in other processes, hold their locks and are left alone."""
        tmp = self.root / "tmp"
        removed = []
        for p in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            key = p.name.split(".", 1)[0]
            if key == building:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                continue
            fh = self.try_lock(key) if KEY_PATTERN.fullmatch(key) else None
            if fh is not None:
                try:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                finally:
                    fh.close()
        return removed

    def begin(self, key: str) -> PendingArtifact:
        """A fresh temporary directory next to objects/ for building ``key`` (hold its lock)."""
        self.sweep_tmp(key)
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with writing(tmp):
            tmp.mkdir(parents=True, exist_ok=True)
        return PendingArtifact(self, key, tmp)

    def commit(self, pending: PendingArtifact, manifest: dict) -> Artifact:
        """Hash the files, write the manifest last, and rename into place (first writer wins). If the disk
        refuses (full, read-only), the temporary directory is removed and a StoreWriteError raised."""
        try:
            with writing(pending.path / MANIFEST):
                return self._commit(pending, manifest)
        except StoreWriteError:
            self.abort(pending)
            raise

    def _commit(self, pending: PendingArtifact, manifest: dict) -> Artifact:
        files = {}
        for p in sorted(pending.path.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(pending.path).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {**manifest, "schema_version": SCHEMA_VERSION, "key": pending.key, "files": files}
        tmp_manifest = pending.path / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp_manifest, pending.path / MANIFEST)
        final = self.path_of(pending.key)
        self.objects.mkdir(parents=True, exist_ok=True)
        if final.exists() and not (final / MANIFEST).is_file():
            shutil.rmtree(final)  # a half-made directory is not an artifact: replace it
        try:
            os.rename(pending.path, final)
        except OSError:
            if not self.exists(pending.key):
                raise
            shutil.rmtree(pending.path, ignore_errors=True)  # someone else committed first
        return self.get(pending.key)

    def abort(self, pending: PendingArtifact) -> None:
        shutil.rmtree(pending.path, ignore_errors=True)

    def remove(self, key: str) -> None:
        """Delete an artifact (used by --force): the manifest goes first so it stops existing at once."""
        path = self.path_of(key)
        with contextlib.suppress(FileNotFoundError):
            (path / MANIFEST).unlink()
        shutil.rmtree(path, ignore_errors=True)
