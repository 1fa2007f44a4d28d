#!/usr/bin/env bash
# The official-baseline config for 60 s on one GPU, through the pipeline, scored on the FineWeb val prefix.
#   bash bench/gpu_baseline.sh   (on the device machine; logs and manifests go to $OUT)
source bench/gpu_setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m golf.cli run --no-prefect --preset baseline \
  --set tokenize.source="$DOCS" --set tokenize.val_docs=902 --set tokenize.workers=16 \
  --set train.max_seconds="${SECONDS_BUDGET:-60}" "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/run.log"
for s in tokenize train average quantize eval compliance; do
  d=$(ls -d $GOLF_STORE/objects/$s-* 2>/dev/null | tail -1)
  [ -n "$d" ] && cp "$d/manifest.json" "$OUT/$s.manifest.json"
done
d=$(ls -d $GOLF_STORE/objects/train-* | tail -1); cp "$d/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
python3 - <<'PY'
import json, glob, os
m = json.load(open(os.environ.get("OUT", "/tmp/out") + "/train.manifest.json"))["metrics"]
steps = [json.loads(l) for l in open(os.environ.get("OUT", "/tmp/out") + "/train_metrics.jsonl")]
ms = sorted(s["step_ms"] for s in steps[5:])
print("train:", {k: m[k] for k in ("steps", "train_seconds", "warmup_seconds", "tokens_per_s", "tflops_per_s", "final_train_loss")})
print("median step ms:", ms[len(ms)//2], "-> tokens/s", round(m.get("tokens", 0) / max(1, m["steps"]) / (ms[len(ms)//2] / 1e3)))
PY
