#!/usr/bin/env bash
# Multi-GPU training check (device machine with 2 GPUs, e.g. nvidia-h200-x2; carry .whl and .gpu/corpus):
# the baseline preset for a fixed 200 steps (a step-based schedule, so the LR at each step is the same
# whatever the speed) on 1 GPU, on 2 GPUs with the same global batch, and on 1 GPU with another seed (the
# noise to compare with); then the rest of the pipeline for the 1-GPU run (its artifact feeds
# bench/gpu_eval_scaling.sh). Each train artifact's train.json + metrics.jsonl land in $OUT/results.tar.gz;
# compare them here with  python bench/compare_runs.py DIR...
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results_multi; mkdir -p "$OUT" $R
trap 'tar -czf "$OUT/results.tar.gz" -C $R .' EXIT
nvidia-smi -L > $R/gpus.txt; cat $R/gpus.txt
COMMON=(--preset baseline --set tokenize.source="$DOCS" --set tokenize.val_docs=902 --set tokenize.workers=32
        --set train.max_seconds=0 --set train.max_steps=${STEPS:-200})
run() { python3 -m golf.cli run --no-prefect "${COMMON[@]}" "$@" 2>&1 | grep -v "it/s\]" | tail -4; }
run --until train
run --until train --set train.nproc=2
run --until train --set train.seed=1
run
for d in $GOLF_STORE/objects/train-*; do
  mkdir -p $R/$(basename $d) && cp $d/train.json $d/metrics.jsonl $d/manifest.json $R/$(basename $d)/
done
for s in average quantize eval; do cp $GOLF_STORE/objects/$s-*/manifest.json $R/$s.manifest.json; done  # quantize writes no quantize.json
