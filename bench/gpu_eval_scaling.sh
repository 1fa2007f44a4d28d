#!/usr/bin/env bash
# Eval variants on 1 and 2 GPUs from the store bench/gpu_multi.sh leaves (same machine, still warm; else it
# re-runs that pipeline first). Full val prefix: plain, sliding64, isolated64; the first 262,144 tokens: the
# no-TTT isolated64 baseline and the three TTT variants. Results in $OUT/results.tar.gz.
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results_eval; mkdir -p "$OUT" $R
trap 'tar -czf "$OUT/results.tar.gz" -C $R .' EXIT
key() { basename "$(ls -d $GOLF_STORE/objects/$1-* | tail -1)"; }
if ! ls -d $GOLF_STORE/objects/quantize-* >/dev/null 2>&1; then
  python3 -m golf.cli run --no-prefect --preset baseline --set tokenize.source="$DOCS" --set tokenize.val_docs=902 \
    --set tokenize.workers=32 --set train.max_seconds=0 --set train.max_steps=${STEPS:-200} 2>&1 | grep -v "it/s\]" | tail -3
fi
TOK=$(key tokenize); AVG=$(key average); Q=$(key quantize)
timeout 170 python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$Q" --tokenize "$TOK" --average "$AVG" \
  --preset baseline --variants plain,sliding64,isolated64 --nproc 1,2 --out $R/full 2>&1 | tail -8
timeout 380 python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$Q" --tokenize "$TOK" \
  --preset baseline --variants isolated64,ttt_sgd,ttt_lora,ttt_phased --nproc 1,2 --max-tokens 262144 \
  --out $R/ttt 2>&1 | tail -10
find $R -name "*.npy" -delete
