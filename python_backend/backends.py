"""One interface over the two implementations of every operator and step: NumPy (the reference,
CPU instances) and CuPy RawKernels (GPU instances).

A Triton model picks its backend once, in ``initialize``, with :func:`get_backend`; tests pick
one per parametrised case.  Both backends take and return arrays of their own kind (``xp``) and
have the same signatures, so nothing above this module switches on the device.

Two levels:

* Steps, what the Triton models call: ``preprocess_batch``, ``roi_step``, ``postprocess_batch``,
  ``warm_up`` (attributes of :class:`Backend`).  ``roi_step`` and ``postprocess_batch`` are
  written once, in :mod:`python_backend.steps`, over the backend's operators.
* Operators, ``backend.ops.<name>`` (:mod:`python_backend.reference.ops` or
  :mod:`python_backend.cuda.ops`, the names in :data:`OPERATORS`):

  - ``nms(boxes [N, 4], scores [N], iou_threshold)`` -> kept indices ``[K]`` int64, by
    descending score, ties in input order (torchvision.ops.nms).
  - ``batched_nms(boxes [N, 4], scores [N], idxs [N] integer, iou_threshold)`` -> ``[K]`` int64
    (torchvision.ops.batched_nms).
  - ``filter_proposals(proposals [B, K, 6], rpn_min_size, rpn_score_thresh, rpn_nms_thresh,
    post_nms_top_n)`` -> :class:`~python_backend.reference.contract.ProposalRois` (rois
    ``[N, 4]``, roi_img ``[N]`` int32, counts ``[B]`` int32, num_rois ``[1]`` int32).
  - ``multilevel_roi_align(features [B, H/s, W/s, C] per stride, rois [R, 4], roi_img [R],
    image_sizes [B, 2], strides, output_size, sampling_ratio, canonical_scale=224,
    canonical_level=4, eps=1e-6, size_divisible=32, *, num_rois=None, out=None)`` ->
    ``[R, S, S, C]`` float32 (torchvision MultiScaleRoIAlign, channels last).
  - ``postprocess_detections(class_scores [R, C], class_boxes [R, C, 4], counts [B],
    image_sizes [B, 2], original_sizes [B, 2], score_thresh, min_size, nms_thresh,
    detections_per_img)`` -> boxes ``[B, D, 4]``, scores ``[B, D]``, labels ``[B, D]`` int32,
    num ``[B, 1]`` int32.
  - ``preprocess_batch(images, settings, canvas=None)``: decoded ``[H, W, 3]`` uint8 images ->
    ``images [B, 3, H, W]`` on ``canvas`` (H, W) (None: the smallest of the settings' canvases
    that holds every image), ``image_sizes [B, 2]``, ``original_sizes [B, 2]`` float32.

  Every operator checks shapes and dtypes first (:mod:`python_backend.reference.contract`) and
  raises ValueError (shape) or TypeError (dtype) naming the bad input and what was expected.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np

DEVICES = ("cpu", "gpu")
OPERATORS = ("nms", "batched_nms", "filter_proposals", "multilevel_roi_align", "postprocess_detections",
             "preprocess_batch")


@dataclass(frozen=True)
class Backend:
    """The steps and operators of one implementation.

    ``preprocess_batch(images, settings, canvas=None)``: see ``ops.preprocess_batch`` above.
    ``roi_step(proposals, features, image_sizes, settings)`` -> :class:`python_backend.steps.RoiBatch`.
    ``postprocess_batch(class_scores, class_boxes, counts, image_sizes, original_sizes, settings)``
    -> boxes ``[B, D, 4]``, scores ``[B, D]``, labels ``[B, D]`` int32, num ``[B, 1]`` int32.
    ``warm_up(settings, max_batch, features_dtype="float32")``: compile kernels and size memory
    pools before serving (``features_dtype``: the FPN maps' dtype, float32 or float16).
    ``ops``: the operators (module docstring).
    """

    name: str  # "numpy" or "cupy"
    device: str  # "cpu" or "gpu"
    xp: ModuleType
    preprocess_batch: Callable
    roi_step: Callable
    postprocess_batch: Callable
    warm_up: Callable
    ops: ModuleType

    def asarray(self, array, dtype=None):
        """``array`` (NumPy, CuPy or anything DLPack-capable) as this backend's array."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array) -> np.ndarray:
        """``array`` as a NumPy array (a copy from the device for CuPy)."""
        if isinstance(array, np.ndarray):
            return array
        get = getattr(array, "get", None)
        return get() if get is not None else np.asarray(array)


def _no_warm_up(settings, max_batch: int, features_dtype: str = "float32") -> None:
    return None


def _backend(name: str, device: str, xp: ModuleType, ops: ModuleType, warm_up: Callable) -> Backend:
    from . import steps

    return Backend(name, device, xp, ops.preprocess_batch, functools.partial(steps.roi_step, ops=ops),
                   functools.partial(steps.postprocess_batch, ops=ops), warm_up, ops)


def _numpy_backend() -> Backend:
    from .reference import ops

    return _backend("numpy", "cpu", np, ops, _no_warm_up)


def _cupy_backend(device_id: int) -> Backend:
    cupy = importlib.import_module("cupy")
    cupy.cuda.Device(device_id).use()
    from .cuda import ops, warm_up

    return _backend("cupy", "gpu", cupy, ops, warm_up.warm_up_roi_step)


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
