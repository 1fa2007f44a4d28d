#!/usr/bin/env bash
# Issue 19 on one H200: the record preset's train_gpt.py, run from its records folder, against the pipeline's own
# train stage (same data, seed and config), then both val_bpb.
#
#   here, once:  bash bench/parity_carry.sh            (.ref: bench_corpus part 0 and the FineWeb sample; .whl: zstandard, brotli)
#   device:      carry .ref and .whl;  bash bench/gpu_program_parity.sh      -> $OUT/program_parity.tar.gz
#                (past the command's limit: call it again on the still-warm machine; the phases done are kept in /tmp)
#   here, after: python bench/program_parity_compare.py <unpacked folder> --out bench/results/program
#
# 1. `golf run --no-prefect --preset record` for STEPS steps through compliance, then `golf submit` (the records
#    folder; --allow-fail: a short run is not a record). 2. The folder's train_gpt.py under torchrun in a scratch copy
#    with ./data linked to the same tokenize artifact (golf.submit.layout_data), PYTHONPATH only the carried wheels,
#    so nothing of golf can be imported. Short-run settings (both sides alike, since the program embeds the
#    pipeline's config): 150 val documents, the training's compile off (COMPILE=on to keep it), dense attention
#    in training and scoring (FlexAttention runs only compiled), no TTT (TTT=phased for the record's).
# EXTRA adds --set flags (a CPU dry run: EXTRA="--set train.model.num_layers=2 ..." DOCS=<a folder of jsonl>).
set -u
START=$(date +%s); LIMIT=${LIMIT:-570}
export CORPUS=${CORPUS:-.ref} PARTS=0
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; R=${RES:-/tmp/program_parity}; mkdir -p "$OUT" "$R"
STEPS=${STEPS:-40}; SEED=${SEED:-42}; COMPILE=${COMPILE:-off}; ISO=false; [ "$COMPILE" = on ] && ISO=true
collect() { tar -czf "$OUT/program_parity.tar.gz" --exclude=weights.bin -C "$R" . 2>/dev/null; }
trap collect EXIT
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
(nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)") > "$R/gpu.txt" 2>&1
if [ ! -f "$R/folder/train_gpt.py" ]; then
  ARGS=(--preset record --set tokenize.source="$DOCS" --set tokenize.val_docs=150 --set tokenize.workers="$(nproc)"
        --set train.max_steps="$STEPS" --set train.max_seconds=100000 --set train.seed="$SEED" --set train.log_every=1
        --set train.compile="$COMPILE" --set train.compile_warmup_steps="${WARM:-5}" --set train.model.doc_isolation=$ISO
        --set eval.doc_isolation=$ISO --set eval.stride=0 --set eval.ttt.method="${TTT:-none}"
        --set quantize.fail_over_cap=false ${EXTRA:-})  # 30 steps' weights do not fit the cap (16.15 MB)
  echo "$(date +%T) pipeline: ${ARGS[*]}" | tee "$R/pipeline.txt"
  timeout --signal=TERM --kill-after=20 "$(left)" python3 -m golf.cli run --no-prefect "${ARGS[@]}" 2>&1 \
    | grep -v "it/s\]" >> "$R/pipeline.txt"
  python3 -m golf.cli artifacts ls > "$R/artifacts.txt" 2>&1
  for s in train quantize eval compliance; do  # the pipeline's figures, for the comparison
    d=$(ls -td "$GOLF_STORE"/objects/$s-* 2>/dev/null | head -1); [ -n "$d" ] || continue
    mkdir -p "$R/pipeline/$s"; cp "$d"/*.json "$d"/metrics.jsonl "$R/pipeline/$s/" 2>/dev/null
  done
  comp=$(awk '$1=="compliance"{print $2}' "$R/artifacts.txt" | tail -1)
  [ -n "$comp" ] || { echo "no compliance artifact: the pipeline did not finish"; tail -20 "$R/pipeline.txt"; exit 1; }
  python3 -m golf.cli submit "$comp" --out "$R/folder" --name "record preset, $STEPS steps (program parity)" \
    --github-id golf-bench --allow-fail > "$R/submit.txt" 2>&1 || { cat "$R/submit.txt"; exit 1; }
  echo "$(date +%T) pipeline and folder done ($(( $(date +%s) - START )) s)" | tee -a "$R/pipeline.txt"
fi
# 2. the folder's program, as a reviewer runs it (torchrun, one process), its run files kept
PYTHONPATH_WHEELS=/tmp/site
timeout --signal=TERM --kill-after=20 "$(left)" python3 - "$R" "$SEED" "$PYTHONPATH_WHEELS" <<'PY' 2>&1 | tee "$R/program.txt"
import json, shutil, sys, time
from pathlib import Path
from artifacts import ArtifactStore
from artifacts.store import default_root
from golf.submit import layout_data, resolve_run, run_program
R, seed, wheels = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sub = json.loads((R / "folder" / "submission.json").read_text())
run = resolve_run(ArtifactStore(default_root()), sub["seed_results"][0]["artifact"])
work = R / "rerun"
shutil.rmtree(work, ignore_errors=True); work.mkdir()
shutil.copyfile(R / "folder" / "train_gpt.py", work / "train_gpt.py")
layout_data(work, run)
t0 = time.time()
res = run_program(work, seed, 1, env={"PYTHONPATH": wheels}, timeout=3000)
res["program_wall_s"] = round(time.time() - t0, 1)
d = work / f"run_seed{seed}"
res["weights_bin_identical"] = (d / "weights.bin").read_bytes() == run.quantize.file("weights.bin").read_bytes()
(R / "program_result.json").write_text(json.dumps(res, indent=2))
for name in ("metrics.jsonl", f"train_seed{seed}.log", "train.json", "size.json", "eval.json"):
    if (d / name).exists():
        shutil.copyfile(d / name, R / f"program_{name}")
shutil.rmtree(work)  # weights and links: not wanted back
print(json.dumps(res))
PY
echo "$(date +%T) done ($(( $(date +%s) - START )) s)"
