#!/usr/bin/env bash
# Device side of bench/fa4_wheels.sh: the call carrying .fa4a keeps its files in /tmp/fa4; the call carrying .fa4b
# joins the cutlass wheel's halves, checks its SHA-256 and installs everything into /tmp/site-fa4, then checks that
# golf's model finds the kernel. Needs both calls on one warm machine (a fresh one has no /tmp/fa4; FA4_TMP moves it).
set -euo pipefail
T=${FA4_TMP:-/tmp/fa4}; mkdir -p "$T"
[ -d .fa4a ] && cp .fa4a/* "$T"/ && echo "first half kept in $T ($(du -sh "$T" | cut -f1)); now carry .fa4b"
if [ -d .fa4b ]; then
  cp .fa4b/* $T/
  ls $T/*.part00 >/dev/null 2>&1 || { echo "no first half in $T: the machine was given back; carry .fa4a again"; exit 1; }
  whl=$(basename "$(ls $T/*.part00)" .part00)
  cat "$T/$whl.part00" "$T/$whl.part01" > "$T/$whl"
  (cd "$T" && sha256sum -c SHA256SUMS)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fa4 $T/*.whl
  # nvidia-cutlass-dsl puts its `cutlass` package on the path through a .pth file, which only a site directory
  # reads (not PYTHONPATH): its dsl_packages folder goes on PYTHONPATH beside /tmp/site-fa4 (gpu_setup.sh does too)
  PYTHONPATH=/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages:$PWD python3 -c "
from gpt.model import FLASH_VARLEN_ERRORS, find_flash_varlen
f = find_flash_varlen(); print('varlen kernel:', f.__name__ if f else None, FLASH_VARLEN_ERRORS.get('flash_attn.cute', ''))"
fi
