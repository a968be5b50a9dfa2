#!/usr/bin/env bash
# Serving knobs of the torch-target ensemble, fp16, one after the other on one GPU (no baseline):
# the runner's options checked on the GPU, the dense networks alone, then benchmarks.perf per variant.
# Usage on the GPU machine, from the repository root (binaries as benchmarks/device_env.sh says):
#   OUT=/some/dir bash benchmarks/knobs_h100.sh [VARIANT ...]
# Variants (default: plain mps): plain = the exporter's defaults; mps = the same repository under a
# CUDA MPS daemon; mps_delay2ms = MPS and max_queue_delay_microseconds 2000 (the default is 0);
# mps_nographs = MPS, no CUDA graphs; mps_i2 = MPS and 2 instances of every step; mps_optimize = MPS
# and --optimize-for-inference; mps_fullcanvases = MPS and --canvases 800x1344,1344x800 (the full
# landscape and portrait canvases only, none of the smaller default ones); mps_pp1 = MPS and one postprocess instance (--postprocess-instances 1; the GPU
# default is 2); mps_masked = MPS and --no-unmasked-rpn (every batch runs the rpn with its extent
# masks; by default batches that fill their canvas, as the 640x480 inputs fill 800x1088, run it
# without); trained_optimize = MPS and --optimize-for-inference, fp16 accuracy only (no speed
# sweep), with a checkpoint trained by benchmarks.train_synthetic (90 s), on its held-out scenes;
# mps_1088 = MPS and --canvases 800x1088 (the one canvas the 640x480 inputs use: a short export);
# mps_rpn2 = MPS and --rpn-instances 2 (two rpn instances, one of every other step); mps_rpn2_1088 = the
# same on the one canvas 800x1088 (a short export and start; compare with mps_1088).
# KNOB_TIMEOUT: seconds per variant, export included (240).
# Writes $OUT/knobs.log, $OUT/dense.txt and $OUT/<variant>.md (benchmarks.perf's summary of each variant).
set -uo pipefail
# shellcheck source=benchmarks/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" knobs
WORK="${WORK:-/tmp/fasterrcnn_knobs}"
CONC="${CONC:-1,4,16,64}"
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(plain mps)
perf() {  # name, work folder, extra benchmarks.perf arguments...
  local name=$1 work=$2 limit=${KNOB_TIMEOUT:-240}
  shift 2
  timeout "$limit" "$PY" -m benchmarks.perf --precisions fp16 --skip-baseline --inputs raw --eager-batches= \
    --concurrency "$CONC" --window-ms 1000 --max-trials 3 --out "/tmp/knobs_$name" --work "$work" "$@"
  echo "variant $name rc=$?"
  cp "/tmp/knobs_$name/summary.md" "$OUT/$name.md" 2>/dev/null
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  if [ -z "${SKIP_CHECKS:-}" ]; then
    timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -W ignore::FutureWarning tests/test_torch_target.py \
      -k "cuda_graph or channels_last or gpu_preprocess or optimized or warmed or bucket"
    timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops_steps.py -k "warm_up"
    timeout 200 "$PY" -m benchmarks.bench_dense | tee "$OUT/dense.txt"
  fi
  for v in "${variants[@]}"; do
    case $v in
      plain) perf plain "$WORK/default" ;;
      mps) perf mps "$WORK/default" --reuse --mps ;;
      mps_delay2ms) perf mps_delay2ms "$WORK/delay2ms" --mps --queue-delay-us 2000 ;;
      mps_nographs) perf mps_nographs "$WORK/nographs" --mps --export-args=--no-cuda-graphs ;;
      mps_i2) perf mps_i2 "$WORK/i2" --mps --instances 2 ;;
      mps_optimize) perf mps_optimize "$WORK/optimize" --mps --export-args=--optimize-for-inference ;;
      mps_fullcanvases) perf mps_fullcanvases "$WORK/fullcanvases" --mps --export-args=--canvases=800x1344,1344x800 ;;
      mps_rpn2) perf mps_rpn2 "$WORK/rpn2" --mps --export-args=--rpn-instances=2 ;;
      mps_pp1) perf mps_pp1 "$WORK/pp1" --mps --export-args=--postprocess-instances=1 ;;
      mps_masked) perf mps_masked "$WORK/masked" --mps --export-args=--no-unmasked-rpn ;;
      # (accuracy on the generated scenes: each fits 800x1088, which the photos do not)
      mps_1088) perf mps_1088 "$WORK/c1088" --mps --export-args="--canvases=800x1088" --accuracy-images synthetic ;;
      mps_rpn2_1088) perf mps_rpn2_1088 "$WORK/rpn2_1088" --mps --export-args="--canvases=800x1088 --rpn-instances=2" \
        --accuracy-images synthetic ;;
      trained_optimize)
        [ -f "$WORK/synthetic.pt" ] || timeout 200 "$PY" -m benchmarks.train_synthetic --out "$WORK/synthetic.pt" --seconds 90
        perf trained_optimize "$WORK/trained_optimize" --mps --export-args=--optimize-for-inference \
          --weights "$WORK/synthetic.pt" --accuracy-images synthetic --no-perf ;;
      *) echo "unknown variant $v" ;;
    esac
  done
} 2>&1 | tee "$OUT/knobs.log"
