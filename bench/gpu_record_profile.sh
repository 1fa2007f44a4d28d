#!/usr/bin/env bash
# Record-class step time on one GPU, with and without the recurrence, dense causal vs document-isolated.
#   bash bench/gpu_record_profile.sh   (device machine; JSON per variant under $OUT/prof)
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/prof"
run() { python3 bench/train_profile.py --preset record --vocab 8192 --out "$OUT/prof" "$@" 2>&1 | grep -E "^RESULT|Error|error" ; }
run --label dense_norecur --recurrence off --set train.model.doc_isolation=false
run --label dense_recur --recurrence on --set train.model.doc_isolation=false
run --label isolated_norecur --recurrence off
run --label isolated_recur --recurrence on
