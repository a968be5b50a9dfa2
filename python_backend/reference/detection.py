"""The detection steps between and after the networks, per image, in NumPy.

Each function mirrors one torchvision stage and names it:
``filter_proposals`` (RegionProposalNetwork.filter_proposals after top-k),
``postprocess_detections`` (RoIHeads.postprocess_detections) and
``rescale_boxes`` (GeneralizedRCNNTransform.postprocess).
"""
from __future__ import annotations

import numpy as np

from .boxes import batched_nms, clip_boxes, small_box_mask


def filter_proposals(proposals: np.ndarray, rpn_min_size: float, rpn_score_thresh: float,
                     rpn_nms_thresh: float, post_nms_top_n: int) -> np.ndarray:
    """RPN proposals of one image -> RoIs.

    Args:
        proposals: ``[K, 6]`` rows ``x1 y1 x2 y2 objectness level`` as the rpn network emits
            them: boxes already clipped to the image, objectness a probability, rows in
            torchvision's order (level by level, each by descending logit), level ``-1`` for
            a padding row that must not count.
    Returns:
        ``[R, 4]`` float32 RoIs, ``R <= post_nms_top_n``, by descending objectness.
    """
    proposals = np.asarray(proposals, dtype=np.float32)
    live = proposals[proposals[:, 5] >= 0]
    boxes, scores, levels = live[:, :4], live[:, 4], live[:, 5]
    keep = small_box_mask(boxes, rpn_min_size) & (scores >= np.float32(rpn_score_thresh))
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = batched_nms(boxes, scores, levels, rpn_nms_thresh)[:post_nms_top_n]
    return np.ascontiguousarray(boxes[keep])


def postprocess_detections(class_scores: np.ndarray, class_boxes: np.ndarray, image_size: tuple[float, float],
                           score_thresh: float, min_size: float, nms_thresh: float,
                           detections_per_img: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Header outputs of one image -> detections on the resized image.

    Args:
        class_scores: ``[R, C]`` softmax scores, class 0 the background.
        class_boxes: ``[R, C, 4]`` decoded boxes per class.
        image_size: resized (height, width).
    Returns:
        boxes ``[D, 4]`` float32, scores ``[D]`` float32, labels ``[D]`` int64, ``D <= detections_per_img``,
        by descending score.
    """
    r, c = class_scores.shape
    boxes = clip_boxes(np.asarray(class_boxes, dtype=np.float32).reshape(r, c, 4), *image_size)
    labels = np.broadcast_to(np.arange(c, dtype=np.int64)[None], (r, c))
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = np.asarray(class_scores, dtype=np.float32)[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    inds = np.flatnonzero(scores > np.float32(score_thresh))
    boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
    keep = small_box_mask(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


def rescale_boxes(boxes: np.ndarray, resized_size: tuple[float, float], original_size: tuple[float, float]) -> np.ndarray:
    """torchvision resize_boxes: scale x by orig_w / resized_w and y by orig_h / resized_h (float32)."""
    ratio_h = np.float32(original_size[0]) / np.float32(resized_size[0])
    ratio_w = np.float32(original_size[1]) / np.float32(resized_size[1])
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, 0::2] *= ratio_w
    out[:, 1::2] *= ratio_h
    return out


def pack_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, slots: int):
    """Fixed-size outputs: ``[slots, 4]``, ``[slots]``, ``[slots]`` int32 and ``[1]`` count; unused slots zero."""
    n = min(boxes.shape[0], slots)
    out_boxes = np.zeros((slots, 4), dtype=np.float32)
    out_scores = np.zeros((slots,), dtype=np.float32)
    out_labels = np.zeros((slots,), dtype=np.int32)
    out_boxes[:n], out_scores[:n], out_labels[:n] = boxes[:n], scores[:n], labels[:n]
    return out_boxes, out_scores, out_labels, np.array([n], dtype=np.int32)
