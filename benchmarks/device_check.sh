#!/usr/bin/env bash
# One-GPU check, under 5 minutes: both frameworks' training step (and encoding) at batch 64,
# 224x224, in float32 and in bf16 (ours: model.dtype=bfloat16; PyTorch: autocast bf16), with
# images/s, peak device memory and MFU from the analytic FLOP count (benchmarks/bench_train_step.py).
#
#   benchmarks/device_check.sh              # needs jax[cuda12] and a CUDA build of torch
#   BATCH=2 SIZE=112 WIDTH=0.0625 REPEATS=1 benchmarks/device_check.sh --allow-cpu   # a smoke run
#
# Prints each run's figures; the last lines are the JSON objects of the runs (float32, then
# bf16; DTYPES="float32" for one), also written to ${OUT:-runs/device_check}/device_check.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${BATCH:-64}"
SIZE="${SIZE:-224}"
WIDTH="${WIDTH:-1.0}"
REPEATS="${REPEATS:-10}"
DTYPES="${DTYPES:-float32 bfloat16}"
OUTDIR="${OUT:-runs/device_check}"
mkdir -p "$OUTDIR"
PYTHON="${PYTHON:-python}"

if [[ "${1:-}" != "--allow-cpu" ]]; then
  "$PYTHON" - <<'PY'
import sys

import jax

if jax.devices()[0].platform != "gpu":
    sys.exit(f"device_check: JAX sees no GPU ({jax.devices()}); install jax[cuda12]")
try:
    import torch
except ImportError:
    sys.exit("device_check: torch is not installed")
if not torch.cuda.is_available():
    sys.exit("device_check: torch sees no CUDA device; install a CUDA build of torch")
print("device:", jax.devices()[0].device_kind, "| torch", torch.__version__, torch.version.cuda)
PY
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

: >"$OUTDIR/device_check.jsonl"
for dtype in $DTYPES; do
  echo "== training step, batch $BATCH, ${SIZE}x${SIZE}, width $WIDTH, $dtype"
  "$PYTHON" benchmarks/bench_train_step.py --batch "$BATCH" --size "$SIZE" --width "$WIDTH" \
    --repeats "$REPEATS" --dtype "$dtype" | tee "$OUTDIR/run_$dtype.txt"
  tail -n 1 "$OUTDIR/run_$dtype.txt" >>"$OUTDIR/device_check.jsonl"
done
echo "== summary ($OUTDIR/device_check.jsonl)"
cat "$OUTDIR/device_check.jsonl"
