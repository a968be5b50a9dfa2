"""The detection stages between and after the networks, in NumPy.

Each function mirrors one torchvision stage and names it:
``filter_proposals`` (RegionProposalNetwork.filter_proposals after top-k),
``postprocess_detections`` (RoIHeads.postprocess_detections, then
GeneralizedRCNNTransform.postprocess's ``rescale_boxes``).  The batch operators have the
signatures of :mod:`python_backend.cuda` (see :mod:`python_backend.backends`); the per-image
stages under them (``filter_image_proposals``, ``postprocess_image``) are what the tests hold
against torchvision.
"""
from __future__ import annotations

import numpy as np

from .boxes import batched_nms, clip_boxes, small_box_mask
from .contract import ProposalRois, check_postprocess_inputs, check_proposals


def filter_image_proposals(proposals: np.ndarray, rpn_min_size: float, rpn_score_thresh: float,
                           rpn_nms_thresh: float, post_nms_top_n: int) -> np.ndarray:
    """RPN proposals of one image -> RoIs.

    Args:
        proposals: ``[K, 6]`` float32 rows ``x1 y1 x2 y2 objectness level`` as the rpn network
            emits them: boxes already clipped to the image, objectness a probability, rows in
            torchvision's order (level by level, each by descending logit), level ``-1`` for
            a padding row that must not count.
    Returns:
        ``[R, 4]`` float32 RoIs, ``R <= post_nms_top_n``, by descending objectness.
    """
    live = proposals[proposals[:, 5] >= 0]
    boxes, scores, levels = live[:, :4], live[:, 4], live[:, 5].astype(np.int64)
    keep = small_box_mask(boxes, rpn_min_size) & (scores >= np.float32(rpn_score_thresh))
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = batched_nms(boxes, scores, levels, rpn_nms_thresh)[:post_nms_top_n]
    return np.ascontiguousarray(boxes[keep])


def filter_proposals(proposals, rpn_min_size: float, rpn_score_thresh: float, rpn_nms_thresh: float,
                     post_nms_top_n: int) -> ProposalRois:
    """RPN proposals of a batch -> RoIs, :func:`filter_image_proposals` image by image.

    Per image: drop level < 0, boxes with a side < ``rpn_min_size`` and scores <
    ``rpn_score_thresh``; NMS per level at ``rpn_nms_thresh``; keep the ``post_nms_top_n``
    best by score, ties in input order.

    Args:
        proposals: ``[B, K, 6]`` floating rows ``x1 y1 x2 y2 objectness level``.
    Returns:
        :class:`ProposalRois` of exactly ``num_rois`` rows, image after image.
    """
    proposals = np.asarray(proposals)
    check_proposals(proposals, post_nms_top_n)
    per_image = [filter_image_proposals(p, rpn_min_size, rpn_score_thresh, rpn_nms_thresh, int(post_nms_top_n))
                 for p in proposals.astype(np.float32, copy=False)]
    counts = np.array([r.shape[0] for r in per_image], dtype=np.int32)
    rois = np.concatenate(per_image) if per_image else np.zeros((0, 4), np.float32)
    roi_img = np.repeat(np.arange(counts.shape[0], dtype=np.int32), counts)
    return ProposalRois(rois, roi_img, counts, np.array([counts.sum()], dtype=np.int32))


def postprocess_image(class_scores: np.ndarray, class_boxes: np.ndarray, image_size: tuple[float, float],
                      score_thresh: float, min_size: float, nms_thresh: float,
                      detections_per_img: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Header outputs of one image -> detections on the resized image (RoIHeads.postprocess_detections).

    Args:
        class_scores: ``[R, C]`` float32 softmax scores, class 0 the background.
        class_boxes: ``[R, C, 4]`` float32 decoded boxes per class.
        image_size: resized (height, width).
    Returns:
        boxes ``[D, 4]`` float32, scores ``[D]`` float32, labels ``[D]`` int64, ``D <= detections_per_img``,
        by descending score.
    """
    r, c = class_scores.shape
    boxes = clip_boxes(class_boxes.reshape(r, c, 4), *image_size)
    labels = np.broadcast_to(np.arange(c, dtype=np.int64)[None], (r, c))
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = class_scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    inds = np.flatnonzero(scores > np.float32(score_thresh))
    boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
    keep = small_box_mask(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


def postprocess_detections(class_scores, class_boxes, counts, image_sizes, original_sizes, score_thresh: float,
                           min_size: float, nms_thresh: float, detections_per_img: int):
    """Header outputs of a batch -> fixed-size detections in original image pixels.

    Per image: :func:`postprocess_image`, :func:`rescale_boxes`, :func:`pack_detections`.

    Args:
        class_scores: ``[R, C]`` floating softmax, class_boxes: ``[R, C, 4]``, image after image.
        counts: ``[B]`` integer RoIs of each image (rows past their sum, such as a filler RoI,
            are ignored).
        image_sizes, original_sizes: ``[B, 2]`` (h, w) resized and decoded sizes.
    Returns:
        boxes ``[B, D, 4]`` float32, scores ``[B, D]`` float32, labels ``[B, D]`` int32 and
        num ``[B, 1]`` int32, ``D = detections_per_img``, unused slots zero.
    """
    class_scores, class_boxes, image_sizes, original_sizes = (
        np.asarray(a) for a in (class_scores, class_boxes, image_sizes, original_sizes))
    counts = check_postprocess_inputs(class_scores, class_boxes, np.asarray(counts), image_sizes, original_sizes)
    class_scores = class_scores.astype(np.float32, copy=False)
    class_boxes = class_boxes.astype(np.float32, copy=False)
    b, d = counts.shape[0], int(detections_per_img)
    if b == 0:
        return (np.zeros((0, d, 4), np.float32), np.zeros((0, d), np.float32), np.zeros((0, d), np.int32),
                np.zeros((0, 1), np.int32))
    starts = np.concatenate([[0], np.cumsum(counts)])
    per_image = []
    for i in range(b):
        a, e = starts[i], starts[i + 1]
        h, w = (float(v) for v in image_sizes[i])
        boxes, scores, labels = postprocess_image(class_scores[a:e], class_boxes[a:e], (h, w), score_thresh,
                                                  min_size, nms_thresh, d)
        boxes = rescale_boxes(boxes, (h, w), tuple(float(v) for v in original_sizes[i]))
        per_image.append(pack_detections(boxes, scores, labels, d))
    return tuple(np.stack(parts) for parts in zip(*per_image))


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
