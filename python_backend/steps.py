"""The roi and postprocess steps over a batch, written once over an operator set.

``ops`` is :mod:`python_backend.reference.ops` (NumPy, the default) or
:mod:`python_backend.cuda.ops` (CuPy): the same operators with the same signatures, on arrays
of their own kind.  :func:`python_backend.backends.get_backend` binds one set per model
instance.  Nothing here knows about Triton or the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .reference import ops as reference_ops
from .settings import DetectorSettings


@dataclass
class RoiBatch:
    """RoIs of a batch of images, concatenated image after image (arrays of the ops' kind)."""

    rois: Any  # [R, 4] float32
    features: Any  # [R, S, S, C] float32, channels last
    counts: Any  # [B] int64: RoIs of each image


def roi_step(proposals, features: list, image_sizes, settings: DetectorSettings, ops=reference_ops) -> RoiBatch:
    """Proposal NMS per image and level, then multi-level ROIAlign, for the whole batch.

    Args:
        proposals: ``[B, K, 6]`` float32 rpn output.
        features: the pooled maps (``settings.roi_strides``), each ``[B, H/s, W/s, C]`` float32 or
            float16 on the canvas (channels last).
        image_sizes: ``[B, 2]`` resized (h, w).
    Returns:
        :class:`RoiBatch`: rois ``[R, 4]``, features ``[R, S, S, C]``, counts ``[B]``.  On the
        GPU, rois and features are views of buffers sized for ``B * rpn_post_nms_top_n`` RoIs.

    Filtering and ROIAlign are queued back to back (ROIAlign reads the RoI count where
    filtering left it); the only host synchronization is the read of that count at the end,
    which sizes R.
    """
    kept = ops.filter_proposals(proposals, settings.rpn_min_size, settings.rpn_score_thresh,
                                settings.rpn_nms_thresh, settings.rpn_post_nms_top_n)
    feats = ops.multilevel_roi_align(features, kept.rois, kept.roi_img, image_sizes, settings.roi_strides,
                                     settings.roi_output_size, settings.roi_sampling_ratio, settings.canonical_scale,
                                     settings.canonical_level, settings.level_eps, settings.size_divisible,
                                     num_rois=kept.num_rois)
    counts = kept.counts.astype(np.int64)
    total = kept.total()
    return RoiBatch(kept.rois[:total], feats[:total], counts)


def postprocess_batch(class_scores, class_boxes, counts, image_sizes, original_sizes, settings: DetectorSettings,
                      ops=reference_ops):
    """Header outputs of a batch -> fixed-size detections in original image pixels.

    Args:
        class_scores: ``[R, C]``, class_boxes: ``[R, C, 4]``, image after image.
        counts: ``[B]`` RoIs of each image (host or device; read on the host).
        image_sizes, original_sizes: ``[B, 2]`` (h, w).
    Returns:
        boxes ``[B, D, 4]``, scores ``[B, D]``, labels ``[B, D]`` int32, num ``[B, 1]`` int32,
        ``D = box_detections_per_img``, unused slots zero.
    """
    return ops.postprocess_detections(class_scores, class_boxes, counts, image_sizes, original_sizes,
                                      settings.box_score_thresh, settings.box_min_size, settings.box_nms_thresh,
                                      settings.box_detections_per_img)

