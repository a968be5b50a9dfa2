"""RoIHeads.postprocess_detections + resize back to original pixels for a batch, on the GPU.

GPU twin of :func:`python_backend.reference.detection.postprocess_detections`.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ..reference.contract import check_postprocess_inputs
from ._modules import EXACT, THREADS, blocks, kernel
from .nms import SCORE_BITS, bits_for, check_key_bits, nms_sorted_segments, rank_keys


def postprocess_detections(class_scores, class_boxes, counts, image_sizes, original_sizes, score_thresh: float,
                           min_size: float, nms_thresh: float, detections_per_img: int):
    """Header outputs of a batch -> packed detections in original pixels, as
    :func:`python_backend.reference.detection.postprocess_detections`.

    Per image: clip every class box to the resized image, keep scores ``> score_thresh`` of
    classes >= 1, drop boxes with a side ``< min_size``, NMS per class at ``nms_thresh``, keep
    the ``detections_per_img`` best (descending score, ties by the reference's flat index
    r * (C - 1) + c - 1), rescale to the original size.

    Pipeline: keys [img | class | -score | r | class] (dropped: ~0) -> sort -> one host sync for
    each image's number of live candidates -> gather -> bitmask NMS over every (image, class)
    -> keys [img | dropped | -score | r | class] -> sort -> packed outputs.

    Arguments and results as the reference's (CuPy arrays; ``counts`` may be on the host or the
    device, it is read on the host).
    """
    scores, boxes, image_sizes, original_sizes = (
        cp.asarray(a) for a in (class_scores, class_boxes, image_sizes, original_sizes))
    counts = check_postprocess_inputs(scores, boxes, np.asarray(cp.asnumpy(counts)), image_sizes, original_sizes)
    b, c = int(counts.shape[0]), int(scores.shape[1])
    scores, boxes, image_sizes, original_sizes = (
        cp.ascontiguousarray(a.astype(cp.float32, copy=False)) for a in (scores, boxes, image_sizes, original_sizes))
    d = int(detections_per_img)
    out_boxes = cp.zeros((b, d, 4), dtype=cp.float32)
    out_scores = cp.zeros((b, d), dtype=cp.float32)
    out_labels = cp.zeros((b, d), dtype=cp.int32)
    out_num = cp.zeros((b, 1), dtype=cp.int32)
    n = int(counts.sum()) * (c - 1)
    if b == 0 or n == 0 or d == 0:
        return out_boxes, out_scores, out_labels, out_num

    class_bits, row_bits, img_bits = bits_for(c), bits_for(int(counts.max())), bits_for(b)
    check_key_bits(1 + img_bits + 2 * class_bits + SCORE_BITS + row_bits, "detection postprocessing")
    row_shift = class_bits
    score_shift = row_shift + row_bits
    code_shift = score_shift + SCORE_BITS
    img_shift = code_shift + class_bits
    row_off = cp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    keys = cp.empty((n,), dtype=cp.uint64)
    kernel("postprocess", "detection_keys", EXACT)(
        (blocks(n),), (THREADS,),
        (scores, boxes, row_off, np.int32(b), np.int32(c), image_sizes, np.float32(score_thresh),
         np.float32(min_size), np.int32(img_shift), np.int32(code_shift), np.int32(score_shift),
         np.int32(row_shift), keys))
    keys.sort()
    seg = cp.zeros((b, 2), dtype=cp.int32)
    kernel("postprocess", "segment_bounds", EXACT)(
        (blocks(n),), (THREADS,), (keys, np.int64(n), np.int32(img_shift), seg))
    seg = seg.get()  # the one host sync: live candidates per image size the NMS launch
    live = (seg[:, 1] - seg[:, 0]).astype(np.int64)
    n_live = int(live.sum())
    if n_live == 0:
        return out_boxes, out_scores, out_labels, out_num
    seg_off = cp.asarray(np.concatenate([[0], np.cumsum(live)]).astype(np.int32))
    keys = keys[:n_live]
    sboxes = cp.empty((n_live, 4), dtype=cp.float32)
    codes = cp.empty((n_live,), dtype=cp.int32)
    row_mask, class_mask = np.uint64((1 << row_bits) - 1), np.uint64((1 << class_bits) - 1)
    kernel("postprocess", "detection_gather", EXACT)(
        (blocks(n_live),), (THREADS,),
        (keys, boxes, row_off, np.int32(c), image_sizes, np.int64(n_live), np.int32(img_shift),
         np.int32(row_shift), row_mask, class_mask, sboxes, codes))
    ncodes = 1 << class_bits
    keep, kept = nms_sorted_segments(sboxes, codes, seg_off, b, int(live.max()), ncodes, ncodes, nms_thresh)
    rank = rank_keys(keys, keep, code_shift, class_bits)
    kernel("postprocess", "detection_outputs", EXACT)(
        (blocks(b * d),), (THREADS,),
        (rank, seg_off, kept, scores, boxes, row_off, np.int32(b), np.int32(c), np.int32(d), image_sizes,
         original_sizes, np.int32(row_shift), row_mask, class_mask, out_boxes, out_scores, out_labels, out_num))
    return out_boxes, out_scores, out_labels, out_num
