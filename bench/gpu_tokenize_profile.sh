#!/usr/bin/env bash
# One device call: CPU topology, tokenize scaling on bench_corpus parts 0-2 (pipeline and no-IPC ceiling),
# then step-time profiles with kernel tables for the record-class config (recurrence off and on) and the
# baseline. Everything lands in $OUT/results.tar.gz (the device returns at most 8 files).
#   bash bench/gpu_tokenize_profile.sh   (device machine; carry .whl and .gpu/corpus)
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; R=/tmp/results; mkdir -p "$OUT" $R/tok $R/prof
trap 'tar -czf "$OUT/results.tar.gz" -C $R .' EXIT
lscpu > $R/lscpu.txt
timeout 240 python3 bench/tokenize_bench.py --corpus .gpu/corpus/part_0.jsonl.zst .gpu/corpus/part_1.jsonl.zst \
  .gpu/corpus/part_2.jsonl.zst --mb ${TOK_MB:-100} --procs 1 8 16 --chunk-kb 0 128 --repeat 2 --ceiling \
  --out $R/tok 2>&1 | grep -v "^{" | tee $R/tok/log.txt
prof() { timeout 200 python3 bench/train_profile.py --out $R/prof "$@" 2>&1 | grep -E "^RESULT|Error|error" | cut -c1-400; }
prof --preset record --vocab 8192 --label rec_dense --recurrence off --set train.model.doc_isolation=false
prof --preset record --vocab 8192 --label rec_dense_recur --recurrence on --set train.model.doc_isolation=false
prof --preset baseline --label base
