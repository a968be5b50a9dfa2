"""The roi and postprocess steps over a batch on the GPU: :mod:`python_backend.steps` with CuPy.

Same signatures and results as the NumPy steps (NMS keep sets and order identical, ROIAlign
within 1e-5), inputs and outputs CuPy arrays (NumPy inputs are copied to the device).
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ..settings import FPN_STRIDES, SIZE_DIVISIBLE, DetectorSettings, level_grid
from ..steps import RoiBatch
from .detection import postprocess_detections_batched
from .proposals import filter_proposals_batched
from .roi_align import multilevel_roi_align


def roi_step(proposals: cp.ndarray, features: list[cp.ndarray], image_sizes: cp.ndarray,
             settings: DetectorSettings) -> RoiBatch:
    """Proposal NMS per image and level, then multi-level ROIAlign, for the whole batch.

    Args:
        proposals: ``[B, K, 6]`` float32 rpn output.
        features: P2..P5, each ``[B, H/s, W/s, 256]`` float32 on the canvas (channels last).
        image_sizes: ``[B, 2]`` resized (h, w).
    Returns:
        :class:`RoiBatch` of CuPy arrays: rois ``[R, 4]``, features ``[R, 7, 7, 256]`` (views
        of buffers sized for ``B * rpn_post_nms_top_n`` RoIs), counts ``[B]`` int64.

    Filtering and ROIAlign run back to back on the device; the only host synchronization is
    the read of the RoI counts at the end, which sizes R.
    """
    kept = filter_proposals_batched(proposals, settings.rpn_min_size, settings.rpn_score_thresh,
                                    settings.rpn_nms_thresh, settings.rpn_post_nms_top_n)
    b = kept.counts.shape[0] - 1
    feats = multilevel_roi_align(features, kept.rois, kept.roi_img, kept.counts[b:], image_sizes, FPN_STRIDES,
                                 settings.roi_output_size, settings.roi_sampling_ratio, settings.canonical_scale,
                                 settings.canonical_level, settings.level_eps, SIZE_DIVISIBLE)
    counts = kept.counts.get()
    total = int(counts[b])
    return RoiBatch(kept.rois[:total], feats[:total], cp.asarray(counts[:b].astype(np.int64)))


def warm_up_roi_step(settings: DetectorSettings, max_batch: int) -> None:
    """One :func:`roi_step` on a full batch of ``max_batch`` canvas-sized images, at load.

    It compiles and loads every kernel before the first request, and leaves CuPy's memory pool
    holding the blocks of the largest batch.  Every buffer of the step is sized by the batch
    alone (RoI buffers for ``B * rpn_post_nms_top_n`` rows), and the inputs of a batch of
    several requests are joined into pool memory of the same sizes as here, so serving reuses
    these blocks.  Without it the pool grew in steps as ever larger batches first arrived
    (+526 MiB over a 5-minute soak on the H100, docs/benchmarks.md).

    The proposals are all marked dropped (level -1): the buffers and launches are the same as
    for real ones, and no RoI survives.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    h, w = settings.canvas
    proposals = cp.zeros((max_batch, settings.num_proposals, 6), dtype=cp.float32)
    proposals[..., 5] = -1
    features = [cp.zeros((max_batch, level_grid(h, s), level_grid(w, s), settings.fpn_channels), dtype=cp.float32)
                for s in FPN_STRIDES]
    sizes = cp.asarray([[h, w]] * max_batch, dtype=cp.float32)
    batch = roi_step(proposals, features, sizes, settings)
    if int(batch.counts.sum()) != 0:
        raise RuntimeError("roi warm-up: dropped proposals produced RoIs")


def postprocess_batch(class_scores: cp.ndarray, class_boxes: cp.ndarray, counts, image_sizes, original_sizes,
                      settings: DetectorSettings):
    """Header outputs of a batch -> fixed-size detections in original image pixels.

    Args:
        class_scores: ``[R, C]``, class_boxes: ``[R, C, 4]``, image after image.
        counts: ``[B]`` RoIs of each image (host or device; read on the host).
        image_sizes, original_sizes: ``[B, 2]`` (h, w).
    Returns:
        boxes ``[B, D, 4]``, scores ``[B, D]``, labels ``[B, D]`` int32, num ``[B, 1]`` int32,
        ``D = box_detections_per_img``, unused slots zero.
    """
    return postprocess_detections_batched(
        class_scores, class_boxes, counts, image_sizes, original_sizes, settings.box_score_thresh,
        settings.box_min_size, settings.box_nms_thresh, settings.box_detections_per_img)


def postprocess_step(class_scores: cp.ndarray, class_boxes: cp.ndarray, image_size, original_size,
                     settings: DetectorSettings):
    """Header outputs of one image -> boxes ``[D, 4]``, scores ``[D]``, labels ``[D]`` int32,
    num ``[1]`` int32 (as :func:`python_backend.steps.postprocess_step`)."""
    r = int(class_scores.shape[0])
    out = postprocess_batch(class_scores, class_boxes, [r], cp.asarray(image_size, dtype=cp.float32).reshape(1, 2),
                            cp.asarray(original_size, dtype=cp.float32).reshape(1, 2), settings)
    return tuple(o[0] for o in out)
