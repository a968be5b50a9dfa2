#!/usr/bin/env bash
# Container entrypoint: prepare the model repository for the GPU found here, then exec tritonserver.
#
# First start: load the detector (MODEL), export rpn/header to ONNX, build TensorRT engines for
# this GPU (TARGET=tensorrt) and write the model repository, all under
#   $CACHE_DIR/repos/<gpu>__trt<version>__<precision>__<hash of settings, options, weights>/
# Later starts with the same GPU, TensorRT, settings and weights reuse it (seconds).
#
# Environment (defaults in brackets):
#   MODEL            coco | random | /path/to/checkpoint.pt (a fasterrcnn_resnet50_fpn state_dict)  [coco]
#   NUM_CLASSES      classes incl. background, for MODEL=random                                    [91]
#   SEED, PEAKY      random weights' seed and classifier scaling, for MODEL=random                 [0, 0]
#   CLASS_NAMES      file with one class name a line, background first                             [COCO's or class_<i>]
#   MIN_SIZE, MAX_SIZE  torchvision transform sizes                                                [the model's: 800, 1333]
#   CANVAS           HxW canvas the rpn runs on, multiples of 32                                   [800x1344]
#   MAX_BATCH_SIZE   images per batch                                                              [8]
#   INSTANCES        instances per model (postprocess: at least 2)                                 [1]
#   TARGET           tensorrt | onnxruntime | onnxruntime-trt | python                             [tensorrt]
#   PRECISION        fp32 | tf32 | fp16 (tensorrt); fp32 | fp16 (onnxruntime-trt)                  [fp16]
#   WORKSPACE_GIB    TensorRT builder workspace                                                    [4]
#   CACHE_DIR        the volume for engines, ONNX, timing caches, torch weights                   [/cache]
#   CUDA_POOL_BYTES  Triton's CUDA memory pool on GPU 0; must hold the largest tensor passed
#                    between steps (RoI features of 8 x 1000 RoIs: 383 MiB; P2 at batch 8: 550 MB) [4294967296]
#   REBUILD=1        ignore the cache and build again
#   PREPARE_ONLY=1   print the repository path and exit instead of starting tritonserver
#   GPU_NAME         override the GPU name read from nvidia-smi (the cache key)
#   EXPORT_PYTHON    the Python with torch/onnxsim/TensorRT bindings                              [/opt/export/bin/python]
# Arguments are passed on to tritonserver (for example --log-verbose=1).
set -euo pipefail

export CACHE_DIR="${CACHE_DIR:-/cache}"
export MODEL="${MODEL:-coco}"
export CANVAS="${CANVAS:-800x1344}"
export MAX_BATCH_SIZE="${MAX_BATCH_SIZE:-8}"
export INSTANCES="${INSTANCES:-1}"
export TARGET="${TARGET:-tensorrt}"
export PRECISION="${PRECISION:-fp16}"
export WORKSPACE_GIB="${WORKSPACE_GIB:-4}"
export REBUILD="${REBUILD:-0}"
CUDA_POOL_BYTES="${CUDA_POOL_BYTES:-4294967296}"
EXPORT_PYTHON="${EXPORT_PYTHON:-/opt/export/bin/python}"
# torchvision downloads COCO weights here once, into the volume
export TORCH_HOME="${TORCH_HOME:-$CACHE_DIR/torch}"

die() { echo "entrypoint: $*" >&2; exit 1; }

case "$TARGET" in
  tensorrt|onnxruntime|onnxruntime-trt|python) ;;
  *) die "TARGET must be tensorrt, onnxruntime, onnxruntime-trt or python, got '$TARGET'" ;;
esac

if [ -z "${GPU_NAME:-}" ]; then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: start the container with --gpus (NVIDIA Container Toolkit)"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n 1) \
    || die "no GPU visible: start the container with --gpus all (or --gpus device=N)"
  [ -n "$GPU_NAME" ] || die "nvidia-smi listed no GPU: start the container with --gpus all"
fi
export GPU_NAME

mkdir -p "$CACHE_DIR" 2>/dev/null || true
[ -w "$CACHE_DIR" ] || die "cache dir $CACHE_DIR is not writable by uid $(id -u): mount a volume there (-v fasterrcnn-cache:$CACHE_DIR)"
[ -x "$EXPORT_PYTHON" ] || command -v "$EXPORT_PYTHON" >/dev/null || die "EXPORT_PYTHON $EXPORT_PYTHON not found"

echo "entrypoint: GPU '$GPU_NAME', MODEL=$MODEL, TARGET=$TARGET, PRECISION=$PRECISION, CANVAS=$CANVAS, MAX_BATCH_SIZE=$MAX_BATCH_SIZE" >&2

# The Python step prints the repository path as its last stdout line; its logs go to stderr.
REPO=$("$EXPORT_PYTHON" - <<'PY' | tail -n 1
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from exporters import loading
from exporters import tensorrt_build as tb
from exporters.onnx_export import export_all
from exporters.repository import RepositoryOptions, write_repository

env = os.environ
say = lambda msg: print(f"entrypoint: {msg}", file=sys.stderr, flush=True)  # noqa: E731


def main():
    kwargs = {k.lower(): int(env[k]) for k in ("MIN_SIZE", "MAX_SIZE") if env.get(k)}
    source = env["MODEL"]
    if source == "coco":
        model, digest = loading.coco_model(**kwargs), "torchvision-COCO_V1"
    elif source == "random":
        n, seed, peaky = int(env.get("NUM_CLASSES", "91")), int(env.get("SEED", "0")), float(env.get("PEAKY", "0"))
        model, digest = loading.random_model(num_classes=n, seed=seed, peaky=peaky, **kwargs), f"random-{n}-{seed}-{peaky}"
    else:
        h = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        model, digest = loading.checkpoint_model(source, **kwargs), h.hexdigest()
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    class_names = loading.read_class_names(env.get("CLASS_NAMES") or None, num_classes)
    try:
        canvas = tuple(int(v) for v in env["CANVAS"].lower().split("x"))
        assert len(canvas) == 2
    except (ValueError, AssertionError):
        raise ValueError(f"CANVAS must be HxW, for example 800x1344, got {env['CANVAS']!r}") from None
    settings = loading.settings_from_model(model, canvas=canvas, class_names=class_names)

    target, precision = env["TARGET"], env["PRECISION"]
    ort_trt = target == "onnxruntime-trt"
    cache = Path(env["CACHE_DIR"])
    options = RepositoryOptions(
        target="onnxruntime" if ort_trt else target, device="gpu", max_batch_size=int(env["MAX_BATCH_SIZE"]),
        instances=int(env["INSTANCES"]), ort_tensorrt=ort_trt, trt_precision=precision if ort_trt else "fp16",
        ort_trt_cache_dir=str(cache / "ort_trt") if ort_trt else "")
    trt_version = tb.require_tensorrt().__version__ if target == "tensorrt" else "none"
    key = tb.engine_cache_key(settings, options, precision, env["GPU_NAME"], trt_version, digest)
    root = cache / "repos" / key
    if (root / "complete.json").is_file() and env.get("REBUILD") != "1":
        say(f"reusing {root}")
        print(root / "model_repository")
        return

    say(f"preparing {root} (first start for this GPU, TensorRT and settings: engine builds take minutes)")
    work = root.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    onnx_paths = export_all(model, settings, work / "onnx")
    plans = None
    if target == "tensorrt":
        gpu_slug = key.split("__")[0]
        plans = tb.build_plans(onnx_paths, work / "plans", settings, options, precision,
                               workspace_bytes=int(float(env["WORKSPACE_GIB"]) * 2**30),
                               timing_cache_path=cache / "timing" / f"{gpu_slug}__trt{trt_version}.cache", printer=say)
    write_repository(work / "model_repository", settings, onnx_paths, options, plans=plans)
    (work / "complete.json").write_text(json.dumps({"gpu": env["GPU_NAME"], "tensorrt": trt_version, "model": digest,
                                                    "precision": precision, "target": target}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    work.rename(root)  # atomic: a crash mid-build leaves only a .partial folder
    say(f"ready: {root}")
    print(root / "model_repository")


try:
    main()
except (tb.TensorRTUnavailable, tb.EngineBuildError, loading.CheckpointError, ValueError, OSError) as e:
    raise SystemExit(f"entrypoint: {type(e).__name__}: {e}") from None
PY
) || die "preparing the model repository failed (see the messages above)"

[ -d "$REPO" ] || die "the preparation step printed '$REPO', which is not a folder"
if [ "${PREPARE_ONLY:-0}" = "1" ]; then
  echo "$REPO"
  exit 0
fi

exec tritonserver --model-repository="$REPO" --cuda-memory-pool-byte-size="0:$CUDA_POOL_BYTES" "$@"
