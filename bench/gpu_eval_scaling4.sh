#!/usr/bin/env bash
# Eval seconds on 1, 2 and 4 GPUs (device machine with 4 GPUs, e.g. nvidia-h200-x4; carry .whl and
# .gpu/corpus): a short baseline-preset pipeline (STEPS steps) for an artifact, then plain, sliding64 and
# isolated64 on the full val prefix at each GPU count. Results in $OUT/results.tar.gz.
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results_eval4; mkdir -p "$OUT" $R
trap 'tar -czf "$OUT/results.tar.gz" -C $R .' EXIT
nvidia-smi -L > $R/gpus.txt
key() { basename "$(ls -d $GOLF_STORE/objects/$1-* | tail -1)"; }
python3 -m golf.cli run --no-prefect --preset baseline --set tokenize.source="$DOCS" --set tokenize.val_docs=902 \
  --set tokenize.workers=32 --set train.max_seconds=0 --set train.max_steps=${STEPS:-50} 2>&1 | grep -v "it/s\]" | tail -3
timeout ${EVAL_TIMEOUT:-170} python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$(key quantize)" \
  --tokenize "$(key tokenize)" --preset baseline --variants plain,sliding64,isolated64 --nproc 1,2,4 \
  --out $R/full 2>&1 | tail -12
find $R -name "*.npy" -delete
