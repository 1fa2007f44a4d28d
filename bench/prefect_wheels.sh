#!/usr/bin/env bash
# Here (with access to PyPI), once: Prefect 3.8.8 and what it needs for the GPU image's Python 3.12, minus
# what that image already has (its package list: the device tool's KINDS.md), into .whl-prefect/ (~36 MB,
# in .gitignore). Carry .whl-prefect with .whl; bench/gpu_setup.sh installs both.
#   bash bench/prefect_wheels.sh
set -euo pipefail
tmp=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$tmp" "prefect==3.8.8" "fastapi<0.151"
# on the image already (2026-11-17 reading); keeping theirs avoids two versions of one package
have="anyio attrs certifi charset-normalizer click cloudpickle colorama filelock fsspec h11 httpcore httpx idna
jinja2 markdown-it-py markupsafe mdurl packaging pathspec pluggy prometheus-client protobuf psutil pygments
python-dateutil pyyaml regex requests rich shellingham six typer typing-extensions urllib3 uvloop
wrapt zipp aiofiles"
mkdir -p .whl-prefect
for f in "$tmp"/*.whl; do
  name=$(basename "$f" | cut -d- -f1 | tr '_.' '--' | tr 'A-Z' 'a-z')
  if ! grep -qw -- "$name" <<<"$have"; then cp "$f" .whl-prefect/; fi
done
rm -rf "$tmp"
ls .whl-prefect | wc -l; du -sh .whl-prefect
