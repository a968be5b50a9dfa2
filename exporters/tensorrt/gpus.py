"""The CUDA devices of this host, and one TensorRT plan per GPU model.

A TensorRT plan is built for one GPU model: another compute capability refuses it, and another
model of the same compute capability loads it with the warning "Using an engine plan file across
different models of devices is not recommended and is likely to affect performance or even cause
errors" (its tactics were timed on the first model).  So a host needs one plan per GPU model.

Triton can pick a plan per GPU only by compute capability: the model config's
``cc_model_filenames`` (key ``"<major>.<minor>"``), read for each instance from its device's
``cudaDeviceProp`` (``BackendModelInstance`` in ``src/backend_model_instance.cc`` of
https://github.com/triton-inference-server/backend; the tensorrt backend's ``ArtifactFilename``);
an instance group has no file of its own.  So one model repository serves one GPU model per
compute capability: :func:`plan_targets` gives each GPU model its plan and refuses two models of
one compute capability (:class:`SharedComputeCapability`), which need one server each (for
example two containers, ``GPUS`` naming one model's GPUs in each; the engine cache key names the
models, so each gets its own repository).  :func:`set_cc_model_filenames` writes the config part.

The device probe uses the CUDA driver API through ctypes, so it needs neither torch nor CuPy.
"""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

PLAN_FILE = "model.plan"  # Triton's default file name in a tensorrt_plan model's version folder
# CUdevice_attribute values (CUDA driver API, cuda.h; https://docs.nvidia.com/cuda/cuda-driver-api/)
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_NAME_BYTES = 256


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as the driver numbers it (the ordinal Triton's ``gpus`` lists use)."""

    index: int
    name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class PlanTarget:
    """One plan file per GPU model, built on ``device_index``, serving every GPU of that model."""

    compute_capability: str
    device_index: int
    gpu_names: tuple[str, ...]  # the one GPU model it is built for and serves
    filename: str


class SharedComputeCapability(ValueError):
    """Two GPU models of one compute capability: one repository can't give each its own plan."""


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and its CUresult."""


def _driver():
    """``libcuda.so.1`` initialised, or None without a driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return cuda if cuda.cuInit(0) == 0 else None


def _check(result: int, call: str) -> None:
    if result != 0:
        raise CudaError(f"{call} failed with CUresult {result}")


def cuda_devices() -> list[GpuInfo]:
    """Every visible CUDA device (``CUDA_VISIBLE_DEVICES`` applies); empty without a driver or GPU."""
    cuda = _driver()
    if cuda is None:
        return []
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    out = []
    for index in range(count.value):
        dev = ctypes.c_int(0)
        _check(cuda.cuDeviceGet(ctypes.byref(dev), index), f"cuDeviceGet({index})")
        name = ctypes.create_string_buffer(_NAME_BYTES)
        _check(cuda.cuDeviceGetName(name, _NAME_BYTES, dev), f"cuDeviceGetName({index})")
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        _check(cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
               "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)")
        _check(cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
               "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)")
        out.append(GpuInfo(index, name.value.decode(errors="replace"), f"{major.value}.{minor.value}"))
    return out


def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (0 without a driver), no torch/CuPy needed."""
    cuda = _driver()
    if cuda is None:
        return 0
    count = ctypes.c_int(0)
    return int(count.value) if cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


@contextmanager
def use_device(index: int | None) -> Iterator[None]:
    """Make device ``index``'s primary context current on this thread for the ``with`` block.

    TensorRT's builder and runtime work on the calling thread's current context, and "CUDA
    Runtime API calls operate on the CUDA Driver API CUcontext which is current to the calling
    host thread" (https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__DRIVER.html), so
    pushing the device's primary context (the one the runtime itself uses for that device) picks
    the GPU without torch or CuPy.  ``None`` leaves the current device as it is.
    """
    if index is None:
        yield
        return
    cuda = _driver()
    if cuda is None:
        raise CudaError(f"no CUDA driver: cannot select device {index}")
    dev, ctx = ctypes.c_int(0), ctypes.c_void_p()
    _check(cuda.cuDeviceGet(ctypes.byref(dev), int(index)), f"cuDeviceGet({index})")
    _check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), f"cuDevicePrimaryCtxRetain({index})")
    try:
        _check(cuda.cuCtxPushCurrent(ctx), f"cuCtxPushCurrent({index})")
        try:
            yield
        finally:
            cuda.cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p()))
    finally:
        cuda.cuDevicePrimaryCtxRelease(dev)


def plan_filename(compute_capability: str) -> str:
    """``model_cc9.0.plan``: the plan file of one compute capability on a mixed host."""
    return f"model_cc{compute_capability}.plan"


def plan_targets(gpus: Sequence[GpuInfo]) -> list[PlanTarget]:
    """One build per distinct GPU model, on its lowest-numbered device.

    With one GPU model the plan keeps Triton's default name :data:`PLAN_FILE` (no
    ``cc_model_filenames`` needed); with several, each of its own compute capability, each gets
    :func:`plan_filename`.  Raises :class:`SharedComputeCapability` for two GPU models of one
    compute capability (the module docstring says why and what to do instead).
    """
    if not gpus:
        raise ValueError("no CUDA device to build TensorRT engines on: expected at least one GPU")
    by_cc: dict[str, dict[str, list[GpuInfo]]] = {}
    for gpu in sorted(gpus, key=lambda g: g.index):
        by_cc.setdefault(gpu.compute_capability, {}).setdefault(gpu.name, []).append(gpu)
    for cc, models in by_cc.items():
        if len(models) > 1:
            found = "; ".join(f"{name}: GPUs {','.join(str(g.index) for g in group)}" for name, group in models.items())
            raise SharedComputeCapability(
                f"GPU models of one compute capability {cc} ({found}) need a TensorRT plan each, and Triton's "
                "TensorRT backend picks a plan by compute capability alone (cc_model_filenames): serve each GPU "
                "model from its own server, e.g. one container per model with GPUS naming that model's GPUs")
    single = len(by_cc) == 1
    return [PlanTarget(cc, group[0].index, (name,), PLAN_FILE if single else plan_filename(cc))
            for cc, models in by_cc.items() for name, group in models.items()]


def set_cc_model_filenames(config, targets: Sequence[PlanTarget]) -> None:
    """Map each compute capability to its plan file in a ``ModelConfig`` (``cc_model_filenames``).

    Nothing is written for a single target: its file is the default :data:`PLAN_FILE`.  On a mixed
    host a GPU of a compute capability not listed finds no file and Triton fails to load that
    instance, naming the missing file, rather than loading a plan built for another GPU.
    """
    if len(targets) < 2:
        return
    for target in targets:
        config.cc_model_filenames[target.compute_capability] = target.filename
