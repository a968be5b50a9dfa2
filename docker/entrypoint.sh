#!/usr/bin/env bash
# Container entrypoint: prepare the model repository for the GPUs found here, then exec tritonserver.
#
# `fasterrcnn prepare` (fasterrcnn/prepare.py) does the preparation: on the first start it loads the
# detector (MODEL), exports rpn/header to ONNX, builds TensorRT engines for this GPU model
# (TARGET=tensorrt) and writes the model repository under $CACHE_DIR/repos/<key>/; later starts with
# the same GPU model, TensorRT, settings and weights reuse it (seconds).  Preparation holds a lock per
# key, and a lease (the file on descriptor 9, which tritonserver inherits) keeps the repository this
# server uses from being deleted by another container's rebuild on the same volume.
#
# Environment (defaults in brackets):
#   MODEL            coco | random | /path/to/checkpoint.pt (a state_dict of a builder of ARCH)     [coco]
#   ARCH             torchvision builder: fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2,        [a checkpoint's,
#                    fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn          else the first]
#   NUM_CLASSES      classes incl. background, for MODEL=random                                    [91]
#   SEED             random weights' seed, for MODEL=random                                        [0]
#   CLASS_NAMES      file with one class name a line, background first                             [COCO's or class_<i>]
#   MIN_SIZE, MAX_SIZE  torchvision transform sizes                                                [the model's: 800, 1333]
#   CANVASES         auto | HxW[,HxW...]: the canvases the rpn runs on, multiples of 32 (CANVAS,    [auto]
#                    one HxW, is read where CANVASES is unset)
#   MAX_BATCH_SIZE   images per batch                                                              [8]
#   INSTANCES        instances per model, on each GPU in use                                       [1]
#   POSTPROCESS_INSTANCES  instances of postprocess (0: at least 2)                                [0]
#   QUEUE_DELAY_US   dynamic batcher max_queue_delay_microseconds                                  [0]
#   GPUS             all | 0,1,... : the GPUs the models run on (ids as nvidia-smi numbers them)   [all]
#   TARGET           tensorrt | onnxruntime | onnxruntime-trt | python                             [tensorrt]
#   PRECISION        fp32 | tf32 | fp16 (tensorrt); fp32 | fp16 (onnxruntime-trt); fp32 (others)  [fp16 for tensorrt
#                                                                                                   and onnxruntime-trt]
#   WORKSPACE_GIB    TensorRT builder workspace                                                    [4]
#   JPEG_DECODER     pillow (libjpeg-turbo: torchvision users' pixels) | gpu (nvJPEG, opt-in)      [pillow]
#   DECODE_THREADS   threads decoding a batch's requests in each preprocess (0: one per CPU, <= 8) [0]
#   CACHE_DIR        the volume for engines, ONNX, timing caches, torch weights                   [/cache]
#   CUDA_POOL_BYTES  Triton's CUDA memory pool on every GPU in use; must hold the largest tensor
#                    passed between steps (RoI features of 8 x 1000 RoIs: 383 MiB)               [4294967296]
#   REBUILD=1        build again (a new generation; the one a running server uses stays)
#   PREPARE_ONLY=1   print the repository path and exit instead of starting tritonserver
#   GPU_NAME         override the GPU name read from nvidia-smi (the cache key)
#   EXPORT_PYTHON    the Python with torch/onnxsim/TensorRT bindings                              [/opt/export/bin/python]
#   SERVING_PYTHON   the Python that runs the drain on SIGTERM (fasterrcnn.drain)                 [python3]
#   DRAIN_TIMEOUT    on SIGTERM/SIGINT, seconds the requests in flight get before tritonserver stops [45]
# Arguments are passed on to tritonserver (for example --log-verbose=1).
set -euo pipefail

export CACHE_DIR="${CACHE_DIR:-/cache}"
export TARGET="${TARGET:-tensorrt}"
CUDA_POOL_BYTES="${CUDA_POOL_BYTES:-4294967296}"
EXPORT_PYTHON="${EXPORT_PYTHON:-/opt/export/bin/python}"
SERVING_PYTHON="${SERVING_PYTHON:-python3}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-45}"
# torchvision downloads COCO weights here once, into the volume
export TORCH_HOME="${TORCH_HOME:-$CACHE_DIR/torch}"
# GPU ids mean the same GPU to Triton (CUDA's numbering) as to nvidia-smi and GPUS
export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"

die() { echo "entrypoint: $*" >&2; exit 1; }

case "$TARGET" in
  tensorrt|onnxruntime|onnxruntime-trt|python) ;;
  *) die "TARGET must be tensorrt, onnxruntime, onnxruntime-trt or python, got '$TARGET'" ;;
esac

# prepare writes repos/, timing/, torch/ beside leases/: the cache's top folder must be ours to write
mkdir -p "$CACHE_DIR/leases" 2>/dev/null || true
if [ ! -w "$CACHE_DIR" ] || [ ! -w "$CACHE_DIR/leases" ]; then
  OWNER=$(stat -c 'owner %u:%g, mode %a' "$CACHE_DIR" 2>/dev/null) || OWNER="missing"
  die "cache dir $CACHE_DIR is not writable by uid $(id -u) ($OWNER). Docker: mount a volume there" \
      "(-v fasterrcnn-cache:$CACHE_DIR). Kubernetes: the volume's CSI driver ignored fsGroup; the cache-owner" \
      "init container (deploy/base) gives the folder to uid 10001 unless the storage squashes root (NFS" \
      "root_squash): then give it to that uid on the storage side (docs/deploy.md)"
fi
[ -x "$EXPORT_PYTHON" ] || command -v "$EXPORT_PYTHON" >/dev/null || die "EXPORT_PYTHON $EXPORT_PYTHON not found"

# The lease: prepare locks it and writes the repository's folder into it; descriptor 9 stays open
# in this shell and in tritonserver, its child, so the lock lasts as long as the server.  Opened
# read-write: on NFS, flock is emulated with byte-range locks (flock(2), NOTES), and a shared lock
# needs a descriptor open for reading, an exclusive one a descriptor open for writing.
LEASE=$(mktemp "$CACHE_DIR/leases/${HOSTNAME:-container}.XXXXXX")
exec 9<>"$LEASE"

# prepare runs as a child that this shell waits for: the shell is the container's PID 1, to which
# the kernel delivers only the signals it traps (pid_namespaces(7)), and bash runs a trap during
# `wait` but not while a foreground command runs.  SIGTERM (docker stop, a pod's deletion) and
# SIGINT reach prepare as SIGTERM (a background job of a non-interactive shell ignores SIGINT).
# prepare prints the repository path as its last stdout line; its messages go to stderr.
PREPARED=$(mktemp "${TMPDIR:-/tmp}/fasterrcnn-prepare.XXXXXX") || die "cannot create a file in ${TMPDIR:-/tmp}"
PREPARING=""
stop() {
  if [ -n "$PREPARING" ]; then
    echo "entrypoint: $1 during the preparation: stopping it" >&2
    kill -TERM "$PREPARING" 2>/dev/null || true
    wait "$PREPARING" || true
  else
    echo "entrypoint: $1 before tritonserver started: stopping" >&2
  fi
  rm -f "$PREPARED" "$LEASE"
  exit "$2"
}
trap 'stop SIGTERM 143' TERM
trap 'stop SIGINT 130' INT
"$EXPORT_PYTHON" -m fasterrcnn prepare --cache-dir "$CACHE_DIR" --lease-fd 9 >"$PREPARED" &
PREPARING=$!
STATUS=0
wait "$PREPARING" || STATUS=$?
PREPARING=""  # the traps stay until tritonserver starts; then they drain it
REPO=$(tail -n 1 "$PREPARED")
rm -f "$PREPARED"
[ "$STATUS" -eq 0 ] || die "preparing the model repository failed (see the messages above)"
[ -d "$REPO" ] || die "the preparation step printed '$REPO', which is not a folder"
if [ "${PREPARE_ONLY:-0}" = "1" ]; then
  echo "$REPO"
  exit 0
fi

# Triton's CUDA memory pool on every GPU the models use (its default is 64 MiB, and tensors between
# steps that don't fit are staged through host memory).
if [ "${GPUS:-all}" = "all" ]; then
  GPU_IDS=$(nvidia-smi --query-gpu=index --format=csv,noheader) || die "nvidia-smi failed: start the container with --gpus all"
else
  GPU_IDS=${GPUS//,/ }
fi
POOLS=()
for id in $GPU_IDS; do
  POOLS+=("--cuda-memory-pool-byte-size=$id:$CUDA_POOL_BYTES")
done
[ "${#POOLS[@]}" -gt 0 ] || die "no GPU found for the CUDA memory pools (GPUS=${GPUS:-all})"

# tritonserver runs as this shell's child, so that SIGTERM and SIGINT drain it before it stops: the
# ensembles are unloaded once their requests in flight are answered (fasterrcnn/drain.py: Triton
# itself refuses an ensemble's next step once it is stopping), then tritonserver gets SIGTERM and
# exits with up to DRAIN_TIMEOUT more seconds (--exit-timeout-secs).  Arguments given to the
# container come last and win; they may move the HTTP port the drain talks to.
HTTP_PORT=8000
previous=""
for arg in "$@"; do
  case "$arg" in --http-port=*) HTTP_PORT="${arg#--http-port=}" ;; esac
  [ "$previous" = "--http-port" ] && HTTP_PORT="$arg"
  previous="$arg"
done
tritonserver --model-repository="$REPO" "${POOLS[@]}" --model-control-mode=explicit --load-model='*' \
  --exit-timeout-secs="$DRAIN_TIMEOUT" "$@" &
SERVER=$!
drain_and_stop() {
  echo "entrypoint: $1: draining tritonserver (the requests in flight get up to $DRAIN_TIMEOUT s), then stopping it" >&2
  "$SERVING_PYTHON" -m fasterrcnn.drain "http://127.0.0.1:$HTTP_PORT" "$DRAIN_TIMEOUT" || true
  kill -TERM "$SERVER" 2>/dev/null || true
}
trap 'drain_and_stop SIGTERM' TERM
trap 'drain_and_stop SIGINT' INT
STATUS=0
wait "$SERVER" || STATUS=$?
# a trapped signal ends `wait` early: wait on until tritonserver itself has exited
while kill -0 "$SERVER" 2>/dev/null; do
  STATUS=0
  wait "$SERVER" || STATUS=$?
done
exit "$STATUS"
