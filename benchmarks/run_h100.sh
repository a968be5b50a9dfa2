#!/usr/bin/env bash
# The whole GPU benchmark in one go (each stage has a timeout): perf sweep of the torch-target
# ensemble (fp32, fp16) against torchvision eager (fp32, fp16 autocast), accuracy on the GPU, the GPU
# preprocess test, then a 45 s soak with bad inputs.
# Usage, from the repository root on the GPU machine (binaries as benchmarks/device_env.sh says):
#   OUT=/some/dir bash benchmarks/run_h100.sh
# SOAK_SECONDS=300 for a 5-minute soak (default 45); SOAK_SECONDS=0 skips it (then run
# `python -m benchmarks.soak` as a command of its own).
# Writes to $OUT (default ./out/bench): summary.md, perf.csv, breakdown.csv, accuracy.csv, soak.csv,
# run.log, and where matplotlib is installed perf.png and soak.png.  Exit code 0 only if every stage passed.
set -uo pipefail
# shellcheck source=benchmarks/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" bench
WORK="${WORK:-/tmp/fasterrcnn_bench}"
# every server (ensemble and baseline alike) under a CUDA MPS daemon of its own; NO_MPS=1 to compare
MPS=(--mps)
[ -n "${NO_MPS:-}" ] && MPS=()
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import torch, torchvision, cupy, numpy; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cupy", cupy.__version__, "numpy", numpy.__version__)'
  timeout 60 "$PY" -m pytest -q -rs -p no:cacheprovider -W ignore::FutureWarning tests/test_torch_target.py -k gpu_preprocess
  tests_rc=$?
  timeout 480 "$PY" -m benchmarks.perf --out "$OUT" --work "$WORK" --window-ms 1200 --max-trials 4 "${MPS[@]}"
  perf_rc=$?
  SOAK_SECONDS="${SOAK_SECONDS:-45}"
  soak_rc=0
  if [ "$SOAK_SECONDS" -gt 0 ]; then
    timeout $((SOAK_SECONDS + 150)) "$PY" -m benchmarks.soak --out "$OUT" --work "$WORK" --seconds "$SOAK_SECONDS" "${MPS[@]}"
    soak_rc=$?
  fi
  echo "gpu preprocess tests rc=$tests_rc perf rc=$perf_rc soak rc=$soak_rc"
  exit $(( tests_rc != 0 || perf_rc != 0 || soak_rc != 0 ))
} 2>&1 | tee "$OUT/run.log"
