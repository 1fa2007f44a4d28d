#!/usr/bin/env bash
# Lays out what bench/parity.sh needs on the device (run here, once): .ref/ (the reference scripts, the FineWeb
# sample and bench_corpus part 0, read from ../shared where they lie) and .whl/ (zstandard and brotli for the
# device image's Python 3.12). Both folders are git-ignored; carry them: run(carry=[".ref", ".whl"]).
set -eu
S=${SHARED:-../shared}
mkdir -p .ref .whl
cp -r "$S/reference/scripts" .ref/ && cp -r "$S/data/fineweb_sample" .ref/ && cp "$S/data/bench_corpus/part_0.jsonl.zst" .ref/
chmod -R u+w .ref
ls .whl/zstandard-*.whl .whl/brotli-*.whl >/dev/null 2>&1 || python3 -m pip download -q --only-binary :all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --no-deps -d .whl zstandard brotli
du -sh .ref .whl
