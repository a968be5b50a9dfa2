"""The roi and postprocess steps over a batch, on top of an ops backend (NumPy or CuPy).

These are what the Triton python-backend models call; they know nothing about Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reference import detection as ref_detection
from .reference import roi_align as ref_roi_align
from .settings import FPN_STRIDES, DetectorSettings, padded_extent


@dataclass
class RoiBatch:
    """RoIs of a batch of images, concatenated image after image."""

    rois: np.ndarray  # [R, 4] float32
    features: np.ndarray  # [R, C, S, S] float32
    counts: np.ndarray  # [B] int64: RoIs of each image


def padded_sizes(image_sizes: np.ndarray) -> np.ndarray:
    """``[B, 2]`` resized sizes -> each image's extent rounded up to 32 (torchvision batch_images)."""
    return np.array([[padded_extent(int(h)), padded_extent(int(w))] for h, w in image_sizes], dtype=np.int64)


def roi_step(proposals: np.ndarray, features: list[np.ndarray], image_sizes: np.ndarray,
             settings: DetectorSettings) -> RoiBatch:
    """Proposal NMS per image and level, then multi-level ROIAlign (CPU reference path).

    Args:
        proposals: ``[B, K, 6]`` rpn output.
        features: P2..P5, each ``[B, H/s, W/s, 256]`` (channels last).
        image_sizes: ``[B, 2]`` resized (h, w).
    """
    rois = [ref_detection.filter_proposals(p, settings.rpn_min_size, settings.rpn_score_thresh,
                                           settings.rpn_nms_thresh, settings.rpn_post_nms_top_n)
            for p in proposals]
    counts = np.array([r.shape[0] for r in rois], dtype=np.int64)
    all_rois = np.concatenate(rois, axis=0) if rois else np.zeros((0, 4), np.float32)
    batch_idx = np.repeat(np.arange(len(rois)), counts)
    feats = ref_roi_align.multilevel_roi_align(
        features, all_rois, batch_idx, padded_sizes(image_sizes), FPN_STRIDES, settings.roi_output_size,
        settings.roi_sampling_ratio, settings.canonical_scale, settings.canonical_level, settings.level_eps)
    return RoiBatch(all_rois, feats, counts)


def postprocess_step(class_scores: np.ndarray, class_boxes: np.ndarray, image_size, original_size,
                     settings: DetectorSettings):
    """Header outputs of one image -> fixed-size detections in original image pixels.

    Returns boxes ``[D, 4]``, scores ``[D]``, labels ``[D]`` int32, num ``[1]`` int32 with
    ``D = box_detections_per_img`` slots, unused ones zero.
    """
    boxes, scores, labels = ref_detection.postprocess_detections(
        class_scores, class_boxes, (float(image_size[0]), float(image_size[1])), settings.box_score_thresh,
        settings.box_min_size, settings.box_nms_thresh, settings.box_detections_per_img)
    boxes = ref_detection.rescale_boxes(boxes, image_size, original_size)
    return ref_detection.pack_detections(boxes, scores, labels, settings.box_detections_per_img)


def postprocess_batch(class_scores: np.ndarray, class_boxes: np.ndarray, counts, image_sizes, original_sizes,
                      settings: DetectorSettings):
    """Header outputs of a batch (RoIs image after image, ``counts [B]`` of each) -> stacked
    fixed-size detections: boxes ``[B, D, 4]``, scores ``[B, D]``, labels ``[B, D]`` int32,
    num ``[B, 1]`` int32.  Same signature as :func:`python_backend.cuda.steps.postprocess_batch`."""
    counts = np.asarray(counts).reshape(-1)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    per_image = [postprocess_step(class_scores[a:b], class_boxes[a:b], image_sizes[i], original_sizes[i], settings)
                 for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
    return tuple(np.stack(parts) for parts in zip(*per_image))
