#!/usr/bin/env bash
# The TTT eval's speed on one GPU, no artifacts (bench/ttt_speed.py): the preset's LoRA forward eager and padded
# (lora_compile=off) against compiled with one dynamic graph and exact shapes (dynamic), then a profile of a short
# eager run (its top ops by device and CPU time; plain LoRA, no warm-up: nothing to compile). Carry nothing.
# Budget for the warm-ups: on an H200 the dynamic graph's compile took 328 s (2026-12-01), and the eager warm-up
# runs 64 documents of every padded length; the first call of this script (DOCS=64, both variants) ran past 460 s
# with neither finished. Each variant's row is written as soon as it is done (speed.log, ttt_speed.json).
#   device: bash bench/gpu_ttt_speed.sh  ->  $OUT/speed/ttt_speed.{json,md}, $OUT/profile/profile_*.txt
set -u
START=$(date +%s); LIMIT=${LIMIT:-580}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
nvidia-smi -L
timeout "$(( $(left) - ${PROFILE_S:-120} ))" python3 bench/ttt_speed.py --preset "${PRESET:-pr1886}" --docs "${DOCS:-64}" \
  --variants "${VARIANTS:-dynamic,eager}" --out "$OUT/speed" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/speed.log" | tail -30
echo "speed: exit ${PIPESTATUS[0]} at $(( $(date +%s) - START )) s"
timeout "$(left)" python3 bench/ttt_speed.py --preset "${PRESET:-pr1886}" --docs 8 --variants "${PROFILE_VARIANTS:-eager}" \
  --profile --no-warmup --set ttt.method=lora --out "$OUT/profile" 2>&1 | tee "$OUT/profile.log" | tail -5
echo "profile: exit ${PIPESTATUS[0]} at $(( $(date +%s) - START )) s"
