"""Box operations in NumPy, written to follow torchvision.ops float32 arithmetic.

Boxes are ``(x1, y1, x2, y2)`` float32 arrays of shape ``[N, 4]``.
"""
from __future__ import annotations

import numpy as np

from .contract import check_nms_inputs


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4] -> [N]``: (x2 - x1) * (y2 - y1), as torchvision.ops.box_area."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def clip_boxes(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """torchvision.ops.clip_boxes_to_image: x into [0, width], y into [0, height]. Any ``[..., 4]``."""
    out = boxes.copy()
    out[..., 0::2] = np.clip(out[..., 0::2], np.float32(0), np.float32(width))
    out[..., 1::2] = np.clip(out[..., 1::2], np.float32(0), np.float32(height))
    return out


def small_box_mask(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """torchvision.ops.remove_small_boxes as a mask: both sides ``>= min_size``."""
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return (ws >= min_size) & (hs >= min_size)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS, torchvision.ops.nms semantics.

    Boxes are visited in descending score order; ties keep input order (a stable sort, as
    torchvision's CPU kernel does).  A box is suppressed when its IoU with a kept box is
    strictly greater than ``iou_threshold``, so a box exactly at the threshold survives.

    Args:
        boxes: ``[N, 4]`` floating (x1, y1, x2, y2), computed in float32.
        scores: ``[N]`` floating.
    Returns:
        int64 indices of kept boxes, in descending score order.
    Raises:
        ValueError / TypeError for a bad shape or a non-floating dtype (torchvision's checks).
    """
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    n = check_nms_inputs(boxes, scores)
    boxes, scores = boxes.astype(np.float32, copy=False), scores.astype(np.float32, copy=False)
    if n == 0:
        return np.zeros((0,), dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    # torchvision's kernel compares the float IoU with the *double* threshold (`ovr > iou_threshold`),
    # so compare in float64: an IoU of float32(0.3) is suppressed at 0.3 because float32(0.3) > 0.3.
    thr = float(iou_threshold)
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = np.arange(i + 1, n)
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        # Same operation order as torchvision's nms_kernel: inter / (area_i + area_j - inter)
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        # Two degenerate (zero-area) boxes give 0 / 0 = NaN, which never suppresses, as in torchvision.
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou.astype(np.float64) > thr]] = True
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS within each category ``idxs``, torchvision.ops.batched_nms semantics (its per-class
    path, which computes IoUs on the boxes as given).

    Returns int64 indices of kept boxes, sorted by descending score (stable on ties).  On tied
    scores torchvision's order is only defined up to 1000 CPU boxes (coordinate-trick path, one
    stable nms, same order as here); above, its per-class path reorders the kept boxes with an
    unstable ``Tensor.sort``.  The coordinate trick also shifts boxes before the IoU, so an IoU
    within rounding of the threshold may decide differently there.

    Args: boxes ``[N, 4]`` and scores ``[N]`` floating, idxs ``[N]`` integer categories.
    """
    boxes, scores, idxs = np.asarray(boxes), np.asarray(scores), np.asarray(idxs)
    check_nms_inputs(boxes, scores, idxs)
    scores = scores.astype(np.float32, copy=False)
    keep_mask = np.zeros(scores.shape[0], dtype=bool)
    for c in np.unique(idxs):
        members = np.flatnonzero(idxs == c)
        keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = np.flatnonzero(keep_mask)
    return kept[np.argsort(-scores[kept], kind="stable")].astype(np.int64)


def decode_boxes(deltas: np.ndarray, boxes: np.ndarray, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float) -> np.ndarray:
    """torchvision BoxCoder.decode_single: ``deltas [N, 4k]`` against ``boxes [N, 4]`` -> ``[N, 4k]``."""
    boxes = boxes.astype(np.float32)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + np.float32(0.5) * widths
    ctr_y = boxes[:, 1] + np.float32(0.5) * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = np.minimum(deltas[:, 2::4] / ww, np.float32(bbox_xform_clip))
    dh = np.minimum(deltas[:, 3::4] / wh, np.float32(bbox_xform_clip))
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = np.exp(dw) * widths[:, None]
    pred_h = np.exp(dh) * heights[:, None]
    half_w = np.float32(0.5) * pred_w
    half_h = np.float32(0.5) * pred_h
    out = np.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=2)
    # [N, k, 4] -> [N, 4k]; explicit sizes because -1 is ambiguous when N == 0
    return out.reshape(deltas.shape[0], deltas.shape[1]).astype(np.float32)
