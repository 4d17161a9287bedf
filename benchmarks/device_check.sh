#!/usr/bin/env bash
# One-GPU check, about 7 minutes on one H200 (budget: under 8). Figures, in this order:
#   1. the training step and encoding (benchmarks/bench_train_step.py), ResNet-50 CSCE-Net at
#      224 x 224, with both kernel choices (model.kernels=xla and cpu) against the PyTorch
#      reference of the release: batch 64 float32 and bf16 against the release-style eager
#      NCHW run, batch 256 bf16 against PyTorch's standard fast form (channels_last + bf16
#      autocast) and against the eager NCHW run; images/s, peak memory, analytic FLOPs, MFU;
#   2. end to end through train.py's loop on a generated JPEG folder (benchmarks/bench_e2e.py,
#      batch 256 bf16, one decode worker per core), from the JPEGs and from a prepared record
#      set (--records), beside the step alone and the input alone;
#   3. the demo, `python train.py --config configs/default.py`, end to end (images/s, mAP).
#
# Installing JAX for CUDA: requirements.txt pins the CPU build (jax and jaxlib 0.10.2). Add the
# CUDA plugin of the same version; the pin then stays satisfied:
#   pip install "jax[cuda13]==0.10.2" -r requirements.txt      # CUDA 13 driver (cuda12: CUDA 12)
# On an image that already has a CUDA JAX of another version, install the rest without the pins:
#   grep -v '^jax' requirements.txt | pip install -r /dev/stdin
# and a CUDA build of torch for the PyTorch side. No XLA flag is needed: the code sets the one
# model.kernels=cpu needs on a GPU (and logs it).
#
#   benchmarks/device_check.sh
#   PRESET=demo BATCH=2 BIG_BATCH=4 REPEATS=1 E2E_IMAGES=48 E2E_STEPS=8 DEMO_STEPS=6 \
#     benchmarks/device_check.sh --allow-cpu                    # a smoke run on the CPU
#
# PRESET=demo runs the demo's narrow model (width 1/16, one block per stage, 112 px) instead
# of ResNet-50; CHECKS="name ..." runs only the named checks (names as in the summary).
# Every run's JSON line goes to ${OUT:-runs/device_check}/device_check.jsonl (a "check" key
# names the run); the last line printed is the summary of them.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${BATCH:-64}"
BIG_BATCH="${BIG_BATCH:-256}"
PRESET="${PRESET:-full}"
REPEATS="${REPEATS:-10}"
E2E_IMAGES="${E2E_IMAGES:-2048}"
E2E_STEPS="${E2E_STEPS:-32}"
DEMO_STEPS="${DEMO_STEPS:-}"
CHECKS="${CHECKS:-}"
OUTDIR="${OUT:-runs/device_check}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUTDIR"

if [[ "${1:-}" != "--allow-cpu" ]]; then
  "$PYTHON" - <<'PY'
import sys

import jax

if jax.devices()[0].platform != "gpu":
    sys.exit(f"device_check: JAX sees no GPU ({jax.devices()}); install jax[cuda13] (see the header)")
try:
    import torch
except ImportError:
    sys.exit("device_check: torch is not installed")
if not torch.cuda.is_available():
    sys.exit("device_check: torch sees no CUDA device; install a CUDA build of torch")
PY
fi
"$PYTHON" -c 'import jax, sys; print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__, "| python", sys.version.split()[0])'
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' || true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

JSONL="$OUTDIR/device_check.jsonl"
: >"$JSONL"

# record NAME COMMAND...: run it, keep its output, add its last line (JSON) with "check": NAME.
record() {
  local name="$1"
  shift
  if [[ -n "$CHECKS" && " $CHECKS " != *" $name "* ]]; then return 0; fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@" | tee "$OUTDIR/$name.txt"
  tail -n 1 "$OUTDIR/$name.txt" | "$PYTHON" -c '
import json, sys
row = json.loads(sys.stdin.read())
print(json.dumps({"check": sys.argv[1], "seconds": int(sys.argv[2]), **row}, sort_keys=True))
' "$name" "$((SECONDS - start))" >>"$JSONL"
}

step() {
  "$PYTHON" benchmarks/bench_train_step.py --preset "$PRESET" --repeats "$REPEATS" "$@"
}

record step_b${BATCH}_float32_xla step --batch "$BATCH" --dtype float32 --kernels xla
record step_b${BATCH}_float32_cpu step --batch "$BATCH" --dtype float32 --kernels cpu --no-torch
record step_b${BATCH}_bf16_xla step --batch "$BATCH" --dtype bfloat16 --kernels xla
record step_b${BIG_BATCH}_bf16_xla step --batch "$BIG_BATCH" --dtype bfloat16 --kernels xla \
  --torch-layout channels_last
record step_b${BIG_BATCH}_bf16_cpu step --batch "$BIG_BATCH" --dtype bfloat16 --kernels cpu --no-torch
record step_b${BIG_BATCH}_bf16_torch_nchw step --batch "$BIG_BATCH" --dtype bfloat16 --no-jax

E2E_ARGS=(--preset "$PRESET" --batch "$BIG_BATCH" --steps "$E2E_STEPS" --images "$E2E_IMAGES")
E2E_ARGS+=(--dtype bfloat16 --records --workers "$("$PYTHON" -c 'import os; print(os.cpu_count())')")
record e2e_b${BIG_BATCH}_bf16 "$PYTHON" benchmarks/bench_e2e.py "${E2E_ARGS[@]}"

# The demo end to end: wall time, images/s of its logged intervals, final query mAP.
DEMO_DIR="$OUTDIR/demo"
rm -rf "$DEMO_DIR"
DEMO_ARGS=(--config configs/default.py --workdir "$DEMO_DIR")
if [[ -n "$DEMO_STEPS" ]]; then DEMO_ARGS+=(--config.total_steps="$DEMO_STEPS" --config.log_every_steps=2); fi
demo() {
  "$PYTHON" train.py "${DEMO_ARGS[@]}" >"$OUTDIR/demo_train.log" 2>&1 || {
    tail -n 20 "$OUTDIR/demo_train.log" >&2
    return 1
  }
  "$PYTHON" - "$DEMO_DIR/metrics.jsonl" <<'PY'
import json, statistics, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["images_per_sec"] for r in rows if "images_per_sec" in r]
final = [r for r in rows if "query_map" in r][-1]
figures = {
    "demo_images_per_sec": round(statistics.median(rates[1:] or rates), 1),
    "demo_query_map": final["query_map"],
    "demo_mfu": statistics.median([r["mfu"] for r in rows if "mfu" in r] or [None]),
}
for k, v in figures.items():
    print(f"{k:40s} {v}")
print(json.dumps(figures, sort_keys=True))
PY
}
record demo_train demo

echo "== summary ($JSONL)"
"$PYTHON" - "$JSONL" <<'PY'
import json, sys

rows = {r["check"]: r for r in map(json.loads, open(sys.argv[1]))}
if not rows:
    sys.exit("device_check: no check ran (CHECKS names none of them?)")
summary = {"seconds": sum(r["seconds"] for r in rows.values())}
for name, r in rows.items():
    for key in ("jax_train_images_per_sec", "torch_train_images_per_sec", "train_ratio_vs_torch",
                "jax_mfu", "e2e_vs_step", "e2e_images_per_sec", "demo_images_per_sec",
                "demo_query_map"):
        if r.get(key) is not None:
            summary[f"{name}.{key}"] = r[key]
for k, v in summary.items():
    print(f"{k:60s} {v}")
print(json.dumps(summary, sort_keys=True))
PY
