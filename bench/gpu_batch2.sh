#!/usr/bin/env bash
# One device call: tokenize throughput on 16 cores, then record-class and baseline step times with the
# fused loss (compare with bench/gpu_record_profile.sh's figures without it).
export PARTS=${PARTS:-0}; source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/prof"
python3 bench/tokenize_bench.py --corpus .gpu/corpus/part_0.jsonl.zst --procs 1 2 4 8 16 --repeat 2 --out "$OUT" 2>&1 | tail -12
run() { python3 bench/train_profile.py --out "$OUT/prof" "$@" 2>&1 | grep -E "^RESULT|Error|error" ; }
run --preset record --vocab 8192 --label rec_dense_norecur_fused --recurrence off --set train.model.doc_isolation=false
run --preset record --vocab 8192 --label rec_dense_recur_fused --recurrence on --set train.model.doc_isolation=false
run --preset baseline --label base_fused
