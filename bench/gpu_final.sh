#!/usr/bin/env bash
# One device call for issues 5 and 6: train the official-baseline config for 60 s through the pipeline, then
# run the quantization schemes and the eval variants on that checkpoint. Summaries land in $OUT.
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; RES=/tmp/res; mkdir -p "$OUT" "$RES"
python3 -m golf.cli run --no-prefect --preset baseline --set tokenize.source="$DOCS" --set tokenize.val_docs=902 \
  --set tokenize.workers=16 --set train.max_seconds=60 2>&1 | grep -v "it/s\]" > "$OUT/run.log"
tail -8 "$OUT/run.log"
key() { basename "$(ls -d $GOLF_STORE/objects/$1-* | tail -1)"; }
TOK=$(key tokenize); AVG=$(key average); Q=$(key quantize)
cp "$GOLF_STORE/objects/$(key train)/manifest.json" "$OUT/train_manifest.json"
timeout 200 python3 bench/quantize_bench.py --weights "$GOLF_STORE/objects/$AVG" --data "$GOLF_STORE/objects/$TOK" \
  --out "$RES/quant" --seq-len 1024 --calib-seqs 64 2>&1 | tail -12
cp "$RES/quant/quantize_bench.json" "$OUT/" 2>/dev/null
timeout 150 python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$Q" --tokenize "$TOK" --average "$AVG" \
  --preset baseline --variants plain,sliding64,isolated64 --out "$RES/eval_full" 2>&1 | tail -8
timeout 200 python3 bench/eval_bench.py --store "$GOLF_STORE" --quantize "$Q" --tokenize "$TOK" \
  --preset baseline --variants plain,ttt_sgd,ttt_lora,ttt_phased --max-tokens 262144 --out "$RES/eval_ttt" 2>&1 | tail -10
for d in eval_full eval_ttt; do cp "$RES/$d/eval_bench.json" "$OUT/${d}.json" 2>/dev/null; done
ls "$OUT"
