#!/usr/bin/env bash
# Record-class step time with the embedding lookup kept out of the compiled graph.
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/prof"
python3 bench/train_profile.py --out "$OUT/prof" --preset record --vocab 8192 --label rec_eager_embed --recurrence off \
  --set train.model.doc_isolation=false --eager-embed 2>&1 | grep -E "^RESULT|Error|error|fused_rms" | cut -c1-200 | head -12
