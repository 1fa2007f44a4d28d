#!/usr/bin/env bash
# Issue 16's proof: a reference script and golf's preset trained side by side, same GPU, data and step count.
#
#   here, once:  bash bench/parity_carry.sh     (.ref/: the reference scripts, the FineWeb sample, bench_corpus
#                                                part 0; .whl/: zstandard + brotli wheels for the device's Python)
#   device:      carry .ref and .whl, then one of (each fits one 600 s command):
#                WHICH=record SIDE=reference STEPS=200 SEED=42 bash bench/parity.sh
#                WHICH=record SIDE=golf      STEPS=200 SEED=42 bash bench/parity.sh
#                WHICH=record SIDE=golf      STEPS=100 ISOLATE=1 bash bench/parity.sh   (throughput, documents isolated)
#   here, after: python bench/parity_compare.py --which record <the fetched parity folders> --out bench/results/parity
#
# POSTQUANT=1 (issue 16's post-quantization check, e.g. STEPS=120): the reference runs on through its GPTQ, its
# brotli artifact and its quantized score (TTT_ENABLED=0: no TTT eval), golf through the preset's own average
# (EMA), quantizer (GPTQ + LQER) and the same non-overlapping scoring, so both report artifact bytes and the
# quantization gap of the same checkpoint size. `parity_compare.py` prints them side by side.
#
# STOP_AFTER=N ends either side after N steps of the STEPS-step schedule (every step logged): for the isolating runs,
# e.g. STOP_AFTER=30 TAG=nofuse EXTRA="--set train.fused_loss=off" on golf's side, the same on the reference's.
#
# Reference side: ../shared/reference/scripts/run_reference.sh (its settings; PREQUANT_ONLY=1 ends the record
# script after its raw and post-EMA scores, before GPTQ). Golf side: `golf run --no-prefect --preset WHICH` with a
# step-based schedule, the final weights (no averaging), round-to-nearest quantization (only its pre-quantization
# score is compared) and non-overlapping 2048-token (baseline: 1024) windows without document isolation, as the
# reference scores. FlashAttention 3 is not on the image, so the reference runs dense causal SDPA over whole rows:
# golf's loss run does the same (train.model.doc_isolation=false); ISOLATE=1 runs golf as a user would
# (documents isolated) for the throughput comparison. Logs land in $OUT/parity/.
set -u
WHICH=${WHICH:-record}; SIDE=${SIDE:-golf}; STEPS=${STEPS:-200}; SEED=${SEED:-42}; ISOLATE=${ISOLATE:-0}
STOP_AFTER=${STOP_AFTER:-0}; TAG=${TAG:-}; POSTQUANT=${POSTQUANT:-0}
[ "$POSTQUANT" = 1 ] && TAG=${TAG}_postquant
if [ "$POSTQUANT" = 1 ] && { [ "$STOP_AFTER" -gt 0 ] || [ "$WHICH" != record ]; }; then
  echo "parity.sh: POSTQUANT=1 runs the record through its GPTQ: no STOP_AFTER, WHICH=record only" >&2; exit 2
fi
export OUT=${OUT:-/tmp/out}; P=$OUT/parity; mkdir -p "$P"
export CORPUS=.ref PARTS=0
source bench/gpu_setup.sh
nvidia-smi -L > "$P/gpu.txt" 2>&1; python3 -c "import torch; print('torch', torch.__version__)" >> "$P/gpu.txt"
if [ "$SIDE" = reference ]; then
  # PREQUANT_ONLY=1 ends the record script after its post-EMA score, but its process then lingers until
  # run_reference.sh's timeout: stop it once that line is written (the baseline exits by itself)
  every=10; [ "$STOP_AFTER" -gt 0 ] && every=1
  done_at="post-ema"; [ "$STOP_AFTER" -gt 0 ] && done_at="^$STOP_AFTER/$STEPS train_loss"
  prequant=1; [ "$POSTQUANT" = 1 ] && prequant=0 && done_at="diagnostic quantized"
  # REF_WARMUP_STEPS=N replaces run_reference.sh's WARMUP_STEPS=20 (the record's compile warm-up, which leaves its
  # sharded Muon momentum primed: see BENCHMARKS.md "Record parity"), and REF_TIMEOUT=S its 575 s limit on the
  # record (which a 120-step POSTQUANT run outlasts; bench/sitting_queue.sh runs it in the background, beyond one
  # call), and REF_FUSED_CE=0 its Triton fused CE off (golf's CE is inductor's: the experiment that separates the
  # two), in a copy beside it so its paths still hold
  sed -e "s/WARMUP_STEPS=20 /WARMUP_STEPS=${REF_WARMUP_STEPS:-20} /" -e "s/timeout 575 /timeout ${REF_TIMEOUT:-575} /" \
    -e "s/FUSED_CE_ENABLED=1 /FUSED_CE_ENABLED=${REF_FUSED_CE:-1} /" \
    .ref/scripts/run_reference.sh > .ref/scripts/run_reference_w.sh
  for want in "WARMUP_STEPS=${REF_WARMUP_STEPS:-20} " "timeout ${REF_TIMEOUT:-575} " "FUSED_CE_ENABLED=${REF_FUSED_CE:-1} "; do
    grep -q "$want" .ref/scripts/run_reference_w.sh || { echo "parity.sh: run_reference.sh has no '$want' after the edit (has the script changed?)" >&2; exit 2; }
  done
  setsid env PREQUANT_ONLY=$prequant TTT_ENABLED=0 TRAIN_LOG_EVERY=$every bash .ref/scripts/run_reference_w.sh "$WHICH" "$STEPS" "$SEED" \
    > "$P/reference_run.txt" 2>&1 &
  ref=$!  # its own process group: stopped as one, nothing else on the machine touched
  while kill -0 $ref 2>/dev/null; do
    if grep -q "$done_at" "$OUT/reference_$WHICH.log" 2>/dev/null; then
      sleep 2; kill -TERM -- -$ref 2>/dev/null; break
    fi
    sleep 5
  done
  wait $ref
  log="$P/reference_${WHICH}_seed$SEED$TAG.log"
  mv "$OUT/reference_$WHICH.log" "$log"
  tail -5 "$log"
  # stopped on purpose once done_at is written (the baseline ends by itself, after its roundtrip score)
  ok_at=$done_at; [ "$WHICH" = baseline ] && [ "$STOP_AFTER" -eq 0 ] && ok_at="final_int8_zlib_roundtrip_exact"
  grep -q "$ok_at" "$log" || { echo "parity.sh: the reference never wrote '$ok_at' (see $P/reference_run.txt)" >&2; exit 1; }
  exit 0
fi
seq=2048; extra=(--set average.method=final --set quantize.method=rtn)  # raw weights: only pre-quant is compared
[ "$POSTQUANT" = 1 ] && extra=()  # the preset's own average and quantizer
if [ "$WHICH" = baseline ]; then seq=1024; extra+=(--set train.warmdown_frac=0.25); fi
iso=false; tag=golf_${WHICH}_seed$SEED$TAG; [ "$ISOLATE" = 1 ] && iso=true && tag=${tag}_isolated
until=eval; [ "$STOP_AFTER" -gt 0 ] && until=train && export GOLF_STORE=/tmp/golf-store-$tag  # its own work dir
setsid python3 -m golf.cli run --no-prefect --preset "$WHICH" --until $until \
  --set tokenize.source="$DOCS" --set tokenize.val_docs=902 --set tokenize.workers="$(nproc)" \
  --set train.max_steps="$STEPS" --set train.max_seconds=100000 --set train.seed="$SEED" \
  --set train.model.doc_isolation=$iso \
  --set quantize.fail_over_cap=false --set eval.seq_len=$seq --set eval.stride=0 --set eval.doc_isolation=false \
  --set eval.ttt.method=none --set eval.no_ttt_diagnostic=false "${extra[@]}" ${EXTRA:-} > "$P/$tag.txt" 2>&1 &
golf=$!
while [ "$STOP_AFTER" -gt 0 ] && kill -0 $golf 2>/dev/null; do  # stop after STOP_AFTER logged steps
  n=$(cat "$GOLF_STORE"/work/train-*/metrics.live.jsonl 2>/dev/null | wc -l)
  [ "$n" -ge "$STOP_AFTER" ] && { kill -TERM -- -$golf; sleep 5; kill -KILL -- -$golf 2>/dev/null; break; }
  sleep 2
done
wait $golf; golf_rc=$?
[ "$STOP_AFTER" -gt 0 ] && golf_rc=0  # stopped on purpose after STOP_AFTER steps
echo "golf exit $golf_rc" | tee -a "$P/$tag.txt"
mkdir -p "$P/$tag"
cp "$(ls -td "$GOLF_STORE"/work/train-* 2>/dev/null | head -1)/metrics.live.jsonl" "$P/$tag/" 2>/dev/null
for s in train quantize eval; do
  d=$(ls -td "$GOLF_STORE"/objects/$s-* 2>/dev/null | head -1); [ -n "$d" ] || continue
  cp "$d"/*.json "$d"/metrics.jsonl "$P/$tag/" 2>/dev/null
done
grep -v "it/s\]" "$P/$tag.txt" | tail -12
exit $golf_rc
