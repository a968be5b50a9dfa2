#!/usr/bin/env bash
# GPU tests + benchmark of python_backend/cuda, in one go, for a machine with CUDA and CuPy.
# Usage: OUT=/some/dir bash benchmarks/run_gpu_checks.sh [benchmarks.bench_cuda_ops arguments]
# Writes $OUT/gpu.txt, $OUT/gpu_tests.txt and $OUT/bench.txt (OUT defaults to ./out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2  # the repository root: python -m benchmarks.* runs from there
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c 'import cupy, torch, torchvision, numpy; print("cupy", cupy.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", numpy.__version__)' 2>&1 | tee -a "$OUT/gpu.txt"
timeout 330 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_ops_*.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=$?
timeout 220 "$PY" -m benchmarks.bench_cuda_ops "$@" 2>&1 | tee "$OUT/bench.txt"
bench_rc=$?
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
