#!/usr/bin/env bash
# fp16 accuracy with a trained checkpoint (random weights give near-tied scores; see
# evaluation/training.py), plus the dense networks alone with a kernel profile.
#   1. benchmarks.train_synthetic: fasterrcnn_resnet50_fpn from scratch on generated shapes, 90 s;
#   2. benchmarks.perf --weights <it> --accuracy-images synthetic --no-perf: ensemble fp32/fp16 (decoded
#      and encoded input) and both baselines against torchvision eager fp32 on held-out generated
#      scenes (no speed sweep; benchmarks/run_h100.sh gates the same accuracy beside its sweep);
#   3. benchmarks.bench_dense --profile-only: the fp16 rpn's CUDA kernels by kind.
# Usage on the GPU machine, from the repository root (binaries as benchmarks/device_env.sh says):
#   OUT=/some/dir bash benchmarks/accuracy_trained_h100.sh
# Writes $OUT/accuracy_trained.log, $OUT/accuracy_trained.md (benchmarks.perf's summary), $OUT/accuracy_trained.csv,
# $OUT/dense.txt.  Exit code 0 only if no goal measured is missed (accuracy, and the server's GPU memory).
set -uo pipefail
# shellcheck source=benchmarks/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" accuracy_trained
WORK="${WORK:-/tmp/fasterrcnn_trained}"
mkdir -p "$WORK"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  timeout 200 "$PY" -m benchmarks.train_synthetic --out "$WORK/synthetic.pt" --seconds 90
  train_rc=$?
  timeout 240 "$PY" -m benchmarks.perf --weights "$WORK/synthetic.pt" --accuracy-images synthetic --no-perf \
    --eager-batches= --baseline-variants i1b8 --work "$WORK" --out "$WORK/perf" --mps
  acc_rc=$?
  cp "$WORK/perf/summary.md" "$OUT/accuracy_trained.md"
  cp "$WORK/perf/accuracy.csv" "$OUT/accuracy_trained.csv"
  timeout 150 "$PY" -m benchmarks.bench_dense --profile-only | tee "$OUT/dense.txt"
  echo "train rc=$train_rc accuracy rc=$acc_rc"
  exit $(( train_rc != 0 || acc_rc != 0 ))
} 2>&1 | tee "$OUT/accuracy_trained.log"
