#!/usr/bin/env bash
# Eval variants on the store left by bench/gpu_final.sh (same machine, still warm) or after re-running it.
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; RES=/tmp/res2; mkdir -p "$OUT" "$RES"
key() { basename "$(ls -d $GOLF_STORE/objects/$1-* | tail -1)"; }
if ! ls -d $GOLF_STORE/objects/quantize-* >/dev/null 2>&1; then
  python3 -m golf.cli run --no-prefect --preset baseline --set tokenize.source="$DOCS" --set tokenize.val_docs=902 \
    --set tokenize.workers=16 --set train.max_seconds=60 2>&1 | grep -v "it/s\]" | tail -4
fi
TOK=$(key tokenize); AVG=$(key average); Q=$(key quantize)
timeout 120 python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$Q" --tokenize "$TOK" --average "$AVG" \
  --preset baseline --variants plain,sliding64,isolated64 --out "$RES/eval_full" 2>&1 | tail -7
timeout 170 python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$Q" --tokenize "$TOK" \
  --preset baseline --variants ttt_sgd,ttt_lora,ttt_phased --max-tokens 262144 --out "$RES/eval_ttt" 2>&1 | tail -7
for d in eval_full eval_ttt; do cp "$RES/$d/eval_bench.json" "$OUT/${d}.json" 2>/dev/null; done
