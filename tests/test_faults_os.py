"""Faults the operating system deals: a full or read-only store, a size limit, and golf killed with SIGKILL.

Each uses the real mechanism: a small tmpfs (mounted here, so these skip where mounting is not allowed), a
read-only remount, RLIMIT_FSIZE, and a real SIGKILL of a real ``golf run``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FAST = ["--set", "train.max_steps=2", "--set", "train.resume_every_s=0.001", "--set", "train.swa_every=0"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` mounted at ``path`` (read-only if asked) for the block; skip where mounting fails."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def golf(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "golf.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(p: subprocess.CompletedProcess, pattern: str) -> str:
    from golf.cli import EXIT_STORE_WRITE
    assert p.returncode == EXIT_STORE_WRITE, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert re.fullmatch(pattern, last), last
    return last


def assert_nothing_partial(store: Path) -> None:
    assert not [p for p in store.rglob("*.part")], sorted(store.rglob("*.part"))
    tmp = store / "tmp"
    assert not (tmp.is_dir() and any(tmp.iterdir())), sorted(tmp.iterdir())


def test_a_full_disk_under_a_training_snapshot_is_one_line_and_leaves_no_part_file(tmp_path):
    """torch.save on a full disk says only "unexpected pos N vs M": golf names the snapshot, removes its .part
    (which would keep the disk full) and exits with code 4; the rerun says the same, not a raw errno 28."""
    store = tmp_path / "store"
    with tmpfs(store / "work", "2m"):
        for _ in range(2):
            p = golf("--store", str(store), "run", "--no-prefect", "--until", "train", *TRAIN_FAST)
            assert_one_line_error(p, rf"golf: error: no space left on device writing {re.escape(str(store))}"
                                     rf"/work/train-[0-9a-f]+/resume\.pt \(errno 28\)")
            assert_nothing_partial(store)
        assert not [k for k in os.listdir(store / "objects") if k.startswith("train-")]


def test_a_full_disk_under_a_stage_output_removes_the_temporary_artifact(tmp_path):
    """tokenize's shards fill tmp/: one line naming where, the half-written artifact directory removed."""
    store = tmp_path / "store"
    with tmpfs(store / "tmp", "1m"):
        p = golf("--store", str(store), "run", "--no-prefect", "--until", "tokenize")
        assert_one_line_error(p, rf"golf: error: no space left on device writing {re.escape(str(store))}"
                                 rf"/tmp/tokenize-\S+ \(errno 28\)")
        assert_nothing_partial(store)


def test_a_read_only_store_is_one_line(tmp_path):
    store = tmp_path / "store"
    with tmpfs(store, "4m", read_only=True):
        p = golf("--store", str(store), "run", "--no-prefect", "--until", "tokenize")
        assert_one_line_error(p, rf"golf: error: read-only file system writing {re.escape(str(store))}/\S+ "
                                 rf"\(errno 30\)")


def test_a_commit_on_a_full_disk_removes_its_temporary_directory(tmp_path):
    from artifacts.store import ArtifactStore, StoreWriteError
    with tmpfs(tmp_path / "disk", "1m"):
        store = ArtifactStore(tmp_path / "disk" / "store")
        pending = store.begin("quantize-0123456789abcdef0123")
        with open(pending.path / "weights.bin", "wb") as f, contextlib.suppress(OSError):
            while True:  # fill the disk: the manifest, written last, finds no room
                f.write(b"\0" * 65536)
                f.flush()
        with pytest.raises(StoreWriteError) as e:
            store.commit(pending, {"stage": "quantize"})
        assert e.value.errno == errno.ENOSPC and "manifest.json" in str(e.value)
        assert not pending.path.exists() and not store.exists(pending.key)


def test_save_atomic_past_the_file_size_limit_names_the_file_and_removes_the_part(tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored): write() fails with EFBIG inside torch.save, which says only
    "unexpected pos". No mount needed."""
    code = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from gpt.training import save_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        f"    save_atomic({{'w': torch.zeros(1 << 20)}}, Path({str(tmp_path / 'final.pt')!r}))\n"
        "except OSError as e:\n"
        "    print(e.errno, e.filename)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    # the core's OSError names the final file; the stage runner words it for the user (StoreWriteError)
    assert p.stdout.strip() == f"{errno.EFBIG} {tmp_path / 'final.pt'}"
    assert os.listdir(tmp_path) == []


# --- golf killed: nothing it started may outlive it ------------------------------------------------------------
MARKER = "GOLF_FAULT_TEST_MARKER"


def _proc_env_has(pid: int, marker: str) -> bool:
    try:
        return f"{MARKER}={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Running (a zombie has finished: only its parent's bookkeeping is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def started_by(marker: str, but: int | None = None) -> list[int]:
    """Live processes whose environment carries ``marker``: the one started with it and all it started."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != but and int(d) != os.getpid()
            and _proc_env_has(int(d), marker) and _alive(int(d))]


def prefect_env(tmp_path: Path, marker: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({MARKER: marker, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONUNBUFFERED": "1"})
    return env


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
def test_sigkill_of_golf_run_leaves_no_temporary_prefect_server(tmp_path):
    """With no PREFECT_API_URL, golf run has a temporary Prefect server (a uvicorn process). kill -9 of golf
    gives it no chance to stop it: the kernel must (the parent-death signal), or it runs on under PID 1."""
    marker = uuid.uuid4().hex
    store = tmp_path / "store"
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "golf.cli", "--store", str(store), "run",
                                 "--set", "train.max_seconds=30"], cwd=ROOT, env=prefect_env(tmp_path, marker),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not list(store.glob("objects/tokenize-*/manifest.json")):  # the flow runs: its server is up
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the flow did not get past tokenize in 240 s"
            time.sleep(0.2)
        children = started_by(marker, but=proc.pid)
        assert any("uvicorn" in _cmdline(c) for c in children), [_cmdline(c) for c in children]
        os.kill(proc.pid, signal.SIGKILL)  # golf only, not its process group
        proc.wait()
        deadline = time.monotonic() + 10
        while started_by(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = started_by(marker)
        assert not left, f"still running after golf was killed: {[(p, _cmdline(p)) for p in left]}"
    finally:
        for pid in [proc.pid, *children, *started_by(marker)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_golf_run_through_prefect_finishes_and_leaves_nothing_running(tmp_path):
    marker = uuid.uuid4().hex
    p = golf("--store", str(tmp_path / "store"), "run", "--until", "tokenize", env=prefect_env(tmp_path, marker))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokenize" in p.stdout and "wall time" in p.stdout
    assert not started_by(marker), [_cmdline(c) for c in started_by(marker)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_temporary_server_that_does_not_start_in_time_is_one_line_and_is_stopped(tmp_path):
    marker = uuid.uuid4().hex
    env = {**prefect_env(tmp_path, marker), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    p = golf("--store", str(tmp_path / "store"), "run", "--until", "tokenize", env=env)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert re.fullmatch(r"golf: error: PrefectServerError: the temporary Prefect server did not answer on "
                        r"http://127\.0\.0\.1:\d+/api within 1 s .*", p.stderr.strip().splitlines()[-1]), p.stderr
    assert not started_by(marker), [_cmdline(c) for c in started_by(marker)]
    assert not (tmp_path / "store" / "objects").exists()  # nothing ran


def test_a_named_server_is_used_and_nothing_is_started(tmp_path, monkeypatch):
    from golf import prefect_env as pe
    monkeypatch.setattr(pe, "_SERVER", None)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(pe, "_start_server", lambda port: pytest.fail("started a server"))
    assert pe.ensure_server() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "profiles.toml").write_text('[profiles.work]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n')
    assert pe.ensure_server() is None
