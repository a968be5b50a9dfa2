#!/usr/bin/env bash
# The full GPU benchmark on one H100 or H200, judged against the performance goals
# (evaluation/goals.py): the GPU preprocess test; a checkpoint trained here on generated scenes
# (evaluation/training.py), or WEIGHTS; then benchmarks.perf: torchvision eager alone, the
# torch-target ensemble per precision (decoded pixels and encoded JPEGs), torchvision served by Triton
# per serving variant, the server's GPU memory, accuracy, and the goals table; then an optional soak.
# Usage, from the repository root on the GPU machine (binaries as benchmarks/device_env.sh says):
#   OUT=/some/dir bash benchmarks/run_h100.sh
# Every precision at once takes more than the device tool's 600 s a command; there, one call each:
#   PRECISIONS=fp16 OUT=... bash benchmarks/run_h100.sh                # fp16 goals, encoded JPEG inputs
#   PRECISIONS=fp32 INPUTS=raw OUT=... bash benchmarks/run_h100.sh     # fp32 goals
#   PRECISIONS=tf32 INPUTS=raw OUT=... bash benchmarks/run_h100.sh     # where asked: tf32 on both sides
# Knobs (environment): PRECISIONS (fp32,fp16; tf32 as well), INPUTS (raw,jpeg,jpeg12mp),
# BASELINE_VARIANTS (i1b8,i2b8,i2b16,i2b16d2000: instances, max batch, queue delay us),
# WEIGHTS (a state_dict to use instead of training one), TRAIN_STEPS (480: a step budget trains the
# same checkpoint on any card; docs/benchmarks.md, session 17, says why), TRAIN_SECONDS (150: a cap),
# EXPORT_ARGS (more arguments for the ensemble's export, e.g. "--rpn-instances=2"), RETRAIN=1 (train
# again even where $WORK/synthetic.pt exists), SOAK_SECONDS (0: no soak), NO_MPS=1 (servers without CUDA
# MPS), WORK (/tmp/fasterrcnn_bench), PERF_TIMEOUT (seconds; 150 + 300 per precision).
# Writes to $OUT: summary.md (goals, throughput, breakdown, memory, accuracy), perf.csv, accuracy.csv,
# run.log, perf.png where matplotlib is installed; soak.csv and soak.png with a soak.
# Exit code 0 only if every stage passed and every goal measured is met.
set -uo pipefail
# shellcheck source=benchmarks/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" bench
WORK="${WORK:-/tmp/fasterrcnn_bench}"
PRECISIONS="${PRECISIONS:-fp32,fp16}"
INPUTS="${INPUTS:-raw,jpeg,jpeg12mp}"
BASELINE_VARIANTS="${BASELINE_VARIANTS:-i1b8,i2b8,i2b16,i2b16d2000}"
TRAIN_STEPS="${TRAIN_STEPS:-480}"
TRAIN_SECONDS="${TRAIN_SECONDS:-150}"
SOAK_SECONDS="${SOAK_SECONDS:-0}"
n_precisions=$(tr ',' '\n' <<<"$PRECISIONS" | grep -c .)
PERF_TIMEOUT="${PERF_TIMEOUT:-$((150 + 300 * n_precisions))}"
# every server (ensemble and baselines alike) under a CUDA MPS daemon of its own; NO_MPS=1 to compare
MPS=(--mps)
[ -n "${NO_MPS:-}" ] && MPS=()
mkdir -p "$WORK"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import torch, torchvision, cupy, numpy; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cupy", cupy.__version__, "numpy", numpy.__version__)'
  timeout 60 "$PY" -m pytest -q -rs -p no:cacheprovider -W ignore::FutureWarning tests/test_torch_target.py -k gpu_preprocess
  tests_rc=$?
  train_rc=0
  if [ -n "${WEIGHTS:-}" ]; then
    weights="$WEIGHTS"
  else
    weights="$WORK/synthetic.pt"
    if [ -f "$weights" ] && [ -z "${RETRAIN:-}" ]; then
      echo "reusing the checkpoint $weights (RETRAIN=1 trains a new one)"
    else
      timeout $((TRAIN_SECONDS + 90)) "$PY" -m benchmarks.train_synthetic --out "$weights" --steps "$TRAIN_STEPS" \
        --seconds "$TRAIN_SECONDS" --check-images 0
      train_rc=$?
    fi
  fi
  timeout "$PERF_TIMEOUT" "$PY" -m benchmarks.perf --out "$OUT" --work "$WORK" --weights "$weights" \
    --accuracy-images synthetic --precisions "$PRECISIONS" --inputs "$INPUTS" \
    --baseline-variants "$BASELINE_VARIANTS" --window-ms 1200 --max-trials 4 "${MPS[@]}" \
    --export-args="${EXPORT_ARGS:-}"
  perf_rc=$?
  soak_rc=0
  if [ "$SOAK_SECONDS" -gt 0 ]; then
    timeout $((SOAK_SECONDS + 150)) "$PY" -m benchmarks.soak --out "$OUT" --work "$WORK" --seconds "$SOAK_SECONDS" "${MPS[@]}"
    soak_rc=$?
  fi
  echo "gpu preprocess tests rc=$tests_rc train rc=$train_rc perf rc=$perf_rc soak rc=$soak_rc (perf: 1 = a goal missed or a stage failed, 124 = timed out; summary.md says which)"
  exit $(( tests_rc != 0 || train_rc != 0 || perf_rc != 0 || soak_rc != 0 ))
} 2>&1 | tee "$OUT/run.log"
