#!/usr/bin/env bash
# Issue 20 on one H200: the seed presets through a short budget, and seed B's weight-decay sweep.
#
#   here, once:  bash bench/parity_carry.sh       (.ref: bench_corpus part 0 and the FineWeb sample; .whl: zstandard, brotli)
#   device:      carry .ref and .whl, then
#                WHAT=sweep bash bench/gpu_seed_presets.sh        golf sweep-train --no-prefect --preset pr281 over
#                                                                  WDS (seed B's 0.040,0.042,0.050), STEPS steps each
#                WHAT=run PRESET=pr1886 bash bench/gpu_seed_presets.sh   one pipeline run, TRAIN_S seconds of training
#                -> $OUT/seed_presets_$WHAT.tar.gz (every stage's json and metrics; the sweep's table)
#
# Short-budget settings: 150 val documents (the FineWeb sample's first), bench_corpus part 0 + the other 752 sample
# documents as train; the sweep's schedule scaled to STEPS (warmdown the last half, an SWA checkpoint every
# STEPS/14 steps: the preset's 7); the run's compile warm-up WARM steps per graph; eval as the preset has it
# (on_budget=stop). Each part ends by LIMIT seconds after the start, with what is done collected.
# EXTRA adds --set flags (a CPU dry run: DOCS=<a folder of jsonl> EXTRA="--set train.model.num_layers=2 ...").
set -u
START=$(date +%s); LIMIT=${LIMIT:-570}; WHAT=${WHAT:-sweep}
export CORPUS=${CORPUS:-.ref} PARTS=0
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; R=${RES:-/tmp/seed_presets_$WHAT}; rm -rf "$R"; mkdir -p "$OUT" "$R"
collect() {
  python3 -m golf.cli artifacts ls > "$R/artifacts.txt" 2>&1
  for d in "$GOLF_STORE"/objects/*; do  # every stage's figures (no weights)
    [ -f "$d/manifest.json" ] || continue; n=$(basename "$d"); mkdir -p "$R/objects/$n"
    cp "$d"/*.json "$d"/metrics.jsonl "$R/objects/$n/" 2>/dev/null
  done
  tar -czf "$OUT/seed_presets_$WHAT.tar.gz" -C "$R" .
}
trap collect EXIT
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
(nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)") > "$R/gpu.txt" 2>&1
DATA=(--set tokenize.source="$DOCS" --set tokenize.val_docs=150 --set tokenize.workers="$(nproc)")
if [ "$WHAT" = sweep ]; then
  STEPS=${STEPS:-140}
  ARGS=(--preset "${PRESET:-pr281}" "${DATA[@]}" --set train.max_steps="$STEPS" --set train.max_seconds=100000
        --set train.warmdown_steps=$((STEPS / 2)) --set train.swa_every=$((STEPS / 14)) --set eval.on_budget=stop
        ${EXTRA:-} --grid train.muon_weight_decay="${WDS:-0.040,0.042,0.050}" --fit)
  echo "$(date +%T) golf sweep-train --no-prefect ${ARGS[*]}" | tee "$R/run.txt"
  timeout --signal=TERM --kill-after=20 "$(left)" python3 -m golf.cli sweep-train --no-prefect --json "$R/sweep.json" \
    "${ARGS[@]}" 2>&1 | grep -v "it/s\]" >> "$R/run.txt"
else
  ARGS=(--preset "${PRESET:-pr1886}" "${DATA[@]}" --set train.max_seconds="${TRAIN_S:-60}"
        --set train.compile_warmup_steps="${WARM:-5}" --set eval.on_budget=stop --set quantize.fail_over_cap=false
        ${EXTRA:-})  # a short run's weights do not fit the cap (16.16 MB after 60 s): its bytes are still reported
  echo "$(date +%T) golf run --no-prefect ${ARGS[*]}" | tee "$R/run.txt"
  timeout --signal=TERM --kill-after=20 "$(left)" python3 -m golf.cli run --no-prefect "${ARGS[@]}" 2>&1 \
    | grep -v "it/s\]" >> "$R/run.txt"
fi
echo "exit ${PIPESTATUS[0]} after $(( $(date +%s) - START )) s" | tee -a "$R/run.txt"
tail -15 "$R/run.txt"
