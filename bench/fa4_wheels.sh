#!/usr/bin/env bash
# flash-attn-4 (CuTe DSL, varlen on Hopper: flash_attn/cute/flash_{fwd,bwd}_sm90.py) for the device image's
# Python 3.12 and CUDA 13, in two carry folders: its nvidia-cutlass-dsl-libs-cu13 wheel is 92 MB, over the 64 MiB
# one device call carries, so it travels in two halves over two calls of one warm machine (its /tmp is kept).
#
#   here, once:  bash bench/fa4_wheels.sh          -> .fa4a/ (the small wheels + the first half), .fa4b/ (the second)
#   device:      call 1, carry .fa4a:  bash bench/fa4_install.sh      (keeps the first half in /tmp/fa4)
#                call 2, carry .fa4b:  bash bench/fa4_install.sh      (joins the halves, installs into /tmp/site-fa4)
#                later calls:          source bench/gpu_setup.sh (it puts /tmp/site-fa4 and cutlass on the path; golf finds
#                                      flash_attn.cute.flash_attn_varlen_func and isolates documents with it)
# Both folders are git-ignored (.git/info/exclude). Versions: the newest flash-attn-4 beta seen (2026-12-01).
set -euo pipefail
FA4=${FA4:-4.0.0b36}; CUTLASS=${CUTLASS:-4.8.1}
tmp=$(mktemp -d)
get() { python3 -m pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" "$@"; }
# what the image lacks of their requirements (cuda-bindings, cuda-pathfinder, protobuf, typing-extensions: it has them)
get "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$CUTLASS" "nvidia-cutlass-dsl-libs-base==$CUTLASS" \
  "nvidia-cutlass-dsl-libs-core==$CUTLASS" "nvidia-cutlass-dsl-libs-cu13==$CUTLASS" "apache-tvm-ffi<0.2,>=0.1.11" \
  "torch-c-dlpack-ext==0.1.5" "quack-kernels==0.6.5" "einops==0.8.2"
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl)
for f in "$tmp"/*.whl; do [ "$f" = "$big" ] || cp "$f" .fa4a/; done
split -n 2 -d "$big" "$tmp/half."
mv "$tmp/half.00" ".fa4a/$(basename "$big").part00"; mv "$tmp/half.01" ".fa4b/$(basename "$big").part01"
(cd "$tmp" && sha256sum "$(basename "$big")") > .fa4b/SHA256SUMS
for d in .fa4a .fa4b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
du -sh .fa4a .fa4b
