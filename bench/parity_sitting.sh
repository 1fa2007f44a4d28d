#!/usr/bin/env bash
# One device sitting for issues 16 and 18: the reference and golf on the same warm H200, in five calls chained
# without pauses (a machine is given back 30 s after a call; /tmp is lost with it). The carry limit (64 MiB with the
# working tree) takes .fa4a alone, then .fa4b + .whl, then .ref. Everything lands under $OUT, a log per step.
#
#   here, once:  bash bench/parity_carry.sh && bash bench/fa4_wheels.sh        (.ref .whl .fa4a .fa4b, git-ignored)
#   call 1:  run(carry=[".fa4a"])          PHASE=fa4a       bash bench/parity_sitting.sh   (seconds, once started)
#   call 2:  run(carry=[".fa4b", ".whl"])  PHASE=fa4b       bash bench/parity_sitting.sh   (FA4 joined, installed)
#   call 3:  run(carry=[".ref"])           PHASE=setup      bash bench/parity_sitting.sh
#            the bench documents and the reference's token files laid out (the prep
#            run_reference.sh does first, run ahead so the reference's own call keeps its 575 s for training);
#            bench/attention_bench.py (ATTN=0 skips it); then the baseline on both sides (200 steps, seed 42;
#            BASELINE=0 skips it)
#   call 4:  run(carry=[])  PHASE=golf       bash bench/parity_sitting.sh   record preset, STEPS (120) steps,
#            documents isolated (FA4 when it imported), through EMA, GPTQ + LQER and the score
#   call 5:  run(carry=[])  PHASE=reference  bash bench/parity_sitting.sh   the record script, STEPS (120) steps,
#            through its GPTQ and quantized score (120 did not fit its 575 s on 2026-12-01: try STEPS=40)
#   other phases, each a call on the same warm machine after setup:
#            PHASE=golf_dense  the record preset on dense rows (no isolation), the band's run, STEPS (120) steps
#            PHASE=kernels     bench/train_profile.py on the record's step: the Triton CE + MLP kernels against the
#                              torch/inductor path, loop off and on (ms per step, top kernels, peak memory;
#                              LOOPS=on for the loop-on pair alone)
#   here:    python bench/parity_compare.py --which record|baseline --ref <log> --golf <folder> --out ...
# A call brings back at most 8 files: each phase packs what it wrote into $OUT/PHASE.tgz (tar xzf it here).
set -u
PHASE=${PHASE:?PHASE=fa4a|fa4b|setup|golf|golf_dense|reference|kernels}
export OUT=${OUT:-/tmp/out}; K=/tmp/keep; mkdir -p "$K" "$OUT"
keep() { [ -e "$1" ] && [ ! -L "$1" ] && rm -rf "${K:?}/$1" && cp -r "$1" "$K/"; [ -e "$1" ] || ln -s "$K/$1" "$1"; }
rc=0  # the phase's status: any step that fails sets it (and the phase still packs what it has)
case $PHASE in
fa4a)
  bash bench/fa4_install.sh || rc=$? ;;
fa4b)
  keep .whl && bash bench/fa4_install.sh || rc=$? ;;
setup)
  keep .whl; keep .ref
  CORPUS=.ref PARTS=0 source bench/gpu_setup.sh  # first: it installs zstandard, which the reference's prep needs
  # the reference's token files (its own tools, as run_reference.sh calls them) in the background; each file is
  # written under a .part name and moved into place, so a prep cut short is redone, not taken for done
  ( set -e; Q=/tmp/refdata F=.ref/fineweb_sample; mkdir -p $Q
    [ -f $Q/part_0.jsonl ] || { PYTHONPATH=/tmp/site python3 -c "import zstandard;zstandard.ZstdDecompressor().copy_stream(open('.ref/part_0.jsonl.zst','rb'),open('$Q/part_0.jsonl.part','wb'))"; mv $Q/part_0.jsonl.part $Q/part_0.jsonl; }
    for v in 1024 8192; do
      [ -d $Q/sp$v ] || { rm -rf $Q/sp$v.part; python3 .ref/scripts/tok_bench.py $F/fineweb_${v}_bpe.model $Q/sp$v.part $Q/part_0.jsonl $F/val_docs_901.jsonl; mv $Q/sp$v.part $Q/sp$v; }
    done
    [ -f $Q/sp8192/fineweb_val_bytes_000000.bin ] || python3 .ref/scripts/make_sidecar.py $F/fineweb_8192_bpe.model \
      $Q/sp8192/fineweb_val_000000.bin $Q/sp8192/fineweb_val_bytes_000000.bin
    echo "reference data ready: $(du -sh $Q | cut -f1)" ) > "$OUT/refdata.txt" 2>&1 &
  prep=$!
  if [ "${ATTN:-1}" = 1 ]; then
    timeout 120 python3 bench/attention_bench.py --out "$OUT/attn" > "$OUT/attn.txt" 2>&1 || rc=$?
    tail -8 "$OUT/attn.txt"
  fi
  if [ "${BASELINE:-1}" = 1 ]; then  # BASELINE=0: the documents and the reference's data only
    WHICH=baseline SIDE=golf STEPS=200 TAG=${TAG:-} bash bench/parity.sh > "$OUT/baseline_golf.txt" 2>&1 || rc=$?
    tail -4 "$OUT/baseline_golf.txt"
  fi
  wait $prep || { rc=1; echo "the reference's data prep failed:"; tail -3 "$OUT/refdata.txt"; }
  if [ "${BASELINE:-1}" = 1 ]; then
    WHICH=baseline SIDE=reference STEPS=200 TAG=${TAG:-} bash bench/parity.sh > "$OUT/baseline_reference.txt" 2>&1 || rc=$?
    tail -3 "$OUT/baseline_reference.txt"
  fi ;;
golf)
  keep .whl; keep .ref
  WHICH=record SIDE=golf STEPS=${STEPS:-120} POSTQUANT=1 ISOLATE=1 TAG=${TAG:-} bash bench/parity.sh || rc=$? ;;
golf_dense)
  keep .whl; keep .ref
  WHICH=record SIDE=golf STEPS=${STEPS:-120} TAG=${TAG:-} bash bench/parity.sh || rc=$? ;;
reference)
  keep .whl; keep .ref
  # POSTQUANT=0 stops at the raw score, which STOP_AFTER needs (parity.sh refuses it with POSTQUANT=1)
  WHICH=record SIDE=reference STEPS=${STEPS:-120} POSTQUANT=${POSTQUANT:-1} TAG=${TAG:-} bash bench/parity.sh || rc=$? ;;
kernels)
  keep .whl; keep .ref
  source bench/gpu_setup.sh; mkdir -p "$OUT/kernels"
  for recur in ${LOOPS:-off on}; do for k in torch triton; do
    timeout 200 python3 bench/train_profile.py --preset record --vocab 8192 --recurrence $recur --label ${k}_loop_$recur \
      --set train.ce_kernel=$k --set train.mlp_kernel=$k --out "$OUT/kernels" > "$OUT/kernels/${k}_loop_$recur.txt" 2>&1 \
      || rc=$?
    grep "^RESULT" "$OUT/kernels/${k}_loop_$recur.txt" | cut -c1-400
  done; done ;;
*)
  echo "parity_sitting.sh: unknown PHASE=$PHASE" >&2; exit 2 ;;
esac
# one file back instead of many (a call returns at most 8)
(cd "$OUT" && tar czf "$PHASE.tgz" --exclude='*.tgz' . 2>/dev/null && find . -mindepth 1 -maxdepth 1 ! -name '*.tgz' \
  -exec rm -rf {} +)
exit $rc
