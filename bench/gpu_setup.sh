# Sourced at the start of every GPU benchmark call (device machine: torch 2.11, no zstandard/brotli/prefect).
# Installs carried wheels from .whl/ into /tmp/site (SITE= another, for two runs at once) and lays out the bench documents once per machine.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then  # .whl-prefect/ too when carried (bench/prefect_wheels.sh)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:-/tmp/site}" .whl/*.whl \
    $(ls .whl-prefect/*.whl 2>/dev/null) && export PYTHONPATH=${SITE:-/tmp/site}:$PWD || echo "wheel install failed"
else
  export PYTHONPATH=$PWD
fi
# FA4 installed on this machine by bench/fa4_install.sh (two earlier calls): golf's model then isolates documents with it
# (cutlass sits in nvidia_cutlass_dsl/dsl_packages, put on the path by a .pth file that PYTHONPATH entries never read)
[ -d /tmp/site-fa4/flash_attn ] && export PYTHONPATH=/tmp/site-fa4:/tmp/site-fa4/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
export PYTHONUNBUFFERED=1 GOLF_STORE=${GOLF_STORE:-/tmp/golf-store}
DOCS=${DOCS:-/tmp/bench_docs}
CORPUS=${CORPUS:-.gpu/corpus}  # the carried bench_corpus parts (part_N.jsonl.zst)
if [ -d "$CORPUS" ] && [ ! -f "$DOCS/.done" ]; then
  python3 bench/prepare_corpus.py --corpus "$CORPUS" --parts "${PARTS:-0,1,2}" --out "$DOCS" && touch "$DOCS/.done"
fi
