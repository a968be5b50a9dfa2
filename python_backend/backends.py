"""One interface over the two implementations of every step: NumPy (the reference, CPU
instances) and CuPy RawKernels (GPU instances).

A Triton model picks its backend once, in ``initialize``, with :func:`get_backend`; tests pick
one per parametrised case.  Both backends take and return arrays of their own kind (``xp``) and
have the same signatures, so nothing above this module switches on the device.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np

DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class Backend:
    """The steps of one implementation.

    ``preprocess_batch(images, settings)``: decoded ``[H, W, 3]`` uint8 images -> ``images
    [B, 3, H, W]``, ``image_sizes [B, 2]``, ``original_sizes [B, 2]`` (float32).
    ``roi_step(proposals, features, image_sizes, settings)`` -> :class:`python_backend.steps.RoiBatch`.
    ``postprocess_batch(class_scores, class_boxes, counts, image_sizes, original_sizes, settings)``
    -> boxes ``[B, D, 4]``, scores ``[B, D]``, labels ``[B, D]`` int32, num ``[B, 1]`` int32.
    ``warm_up(settings, max_batch)``: compile kernels and size memory pools before serving.
    """

    name: str  # "numpy" or "cupy"
    device: str  # "cpu" or "gpu"
    xp: ModuleType
    preprocess_batch: Callable
    roi_step: Callable
    postprocess_batch: Callable
    warm_up: Callable

    def asarray(self, array, dtype=None):
        """``array`` (NumPy, CuPy or anything DLPack-capable) as this backend's array."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array) -> np.ndarray:
        """``array`` as a NumPy array (a copy from the device for CuPy)."""
        if isinstance(array, np.ndarray):
            return array
        get = getattr(array, "get", None)
        return get() if get is not None else np.asarray(array)


def _no_warm_up(settings, max_batch: int) -> None:
    return None


def _numpy_backend() -> Backend:
    from . import steps
    from .reference import image

    return Backend("numpy", "cpu", np, image.preprocess_batch, steps.roi_step, steps.postprocess_batch, _no_warm_up)


def _cupy_backend(device_id: int) -> Backend:
    cupy = importlib.import_module("cupy")
    cupy.cuda.Device(device_id).use()
    from .cuda import image, steps

    return Backend("cupy", "gpu", cupy, image.preprocess_batch, steps.roi_step, steps.postprocess_batch,
                   steps.warm_up_roi_step)


def get_backend(device: str, device_id: int = 0) -> Backend:
    """The backend for ``device`` ("cpu": NumPy; "gpu": CuPy on GPU ``device_id``, made current).

    CuPy is imported only for "gpu"; a machine without it raises ImportError naming the package.
    """
    if device == "cpu":
        return _numpy_backend()
    if device == "gpu":
        if not isinstance(device_id, int) or device_id < 0:
            raise ValueError(f"device_id must be a GPU index >= 0, got {device_id!r}")
        return _cupy_backend(device_id)
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
