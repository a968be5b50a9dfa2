"""RPN proposal filtering for a whole batch on the GPU, with no host synchronization.

GPU twin of :func:`python_backend.reference.detection.filter_proposals` applied to every image.
"""
from __future__ import annotations

from dataclasses import dataclass

import cupy as cp
import numpy as np

from ._modules import EXACT, THREADS, blocks, kernel
from .nms import SCORE_BITS, bits_for, check_key_bits, nms_sorted_segments, rank_keys

LEVEL_BITS = 4  # level codes 0..14, 15 = dropped row
INVALID_LEVEL = (1 << LEVEL_BITS) - 1


@dataclass
class ProposalRois:
    """Surviving RoIs, image after image, in a buffer sized for the worst case (B * top_n rows)."""

    rois: cp.ndarray  # [B * top_n, 4] float32; rows past counts[B] are unspecified
    roi_img: cp.ndarray  # [B * top_n] int32 image of each row
    counts: cp.ndarray  # [B + 1] int32: RoIs of each image, then their sum


def filter_proposals_batched(proposals: cp.ndarray, rpn_min_size: float, rpn_score_thresh: float,
                             rpn_nms_thresh: float, post_nms_top_n: int) -> ProposalRois:
    """Proposals of a batch -> RoIs, as ``filter_proposals`` on each image.

    Per image: drop level < 0, boxes with a side < ``rpn_min_size`` and scores < ``rpn_score_thresh``;
    NMS per level at ``rpn_nms_thresh``; keep the ``post_nms_top_n`` best by score, ties in
    input order (``batched_nms(...)[:post_nms_top_n]``).

    Pipeline (all images at once, no host round trip):
    keys [img | level | -score | k] -> sort -> gather boxes -> bitmask NMS over every
    (image, level) group -> keys [img | dropped | -score | k] -> sort -> compaction.

    Args:
        proposals: ``[B, K, 6]`` float32 rows ``x1 y1 x2 y2 objectness level``; integer levels
            0..14 (rpn emits 0..4), -1 for padding.
    """
    proposals = cp.ascontiguousarray(cp.asarray(proposals, dtype=cp.float32))
    if proposals.ndim != 3 or proposals.shape[2] != 6:
        raise ValueError(f"proposals must be [B, K, 6], got {proposals.shape}")
    if post_nms_top_n < 1:
        raise ValueError(f"post_nms_top_n must be positive, got {post_nms_top_n}")
    b, k = int(proposals.shape[0]), int(proposals.shape[1])
    rois = cp.empty((b * post_nms_top_n, 4), dtype=cp.float32)
    roi_img = cp.empty((b * post_nms_top_n,), dtype=cp.int32)
    counts = cp.zeros((b + 1,), dtype=cp.int32)
    if b == 0 or k == 0:
        return ProposalRois(rois, roi_img, counts)
    idx_bits, img_bits = bits_for(k), bits_for(b)
    check_key_bits(img_bits + LEVEL_BITS + SCORE_BITS + idx_bits, "proposal filtering")
    score_shift = idx_bits
    code_shift = score_shift + SCORE_BITS
    img_shift = code_shift + LEVEL_BITS
    n = b * k
    keys = cp.empty((n,), dtype=cp.uint64)
    kernel("proposals", "proposal_keys", EXACT)(
        (blocks(n),), (THREADS,),
        (proposals, np.int32(b), np.int32(k), np.float32(rpn_min_size), np.float32(rpn_score_thresh),
         np.int32(INVALID_LEVEL), np.int32(img_shift), np.int32(code_shift), np.int32(score_shift), keys))
    keys = cp.sort(keys)
    sboxes = cp.empty((n, 4), dtype=cp.float32)
    codes = cp.empty((n,), dtype=cp.int32)
    idx_mask = np.uint64((1 << idx_bits) - 1)
    kernel("proposals", "proposal_gather", EXACT)(
        (blocks(n),), (THREADS,),
        (keys, proposals, np.int64(n), np.int32(k), np.int32(img_shift), np.int32(code_shift),
         np.uint64(INVALID_LEVEL), idx_mask, sboxes, codes))
    seg_off = cp.arange(0, n + 1, k, dtype=cp.int32)
    keep, kept = nms_sorted_segments(sboxes, codes, seg_off, b, k, INVALID_LEVEL + 1, INVALID_LEVEL,
                                     rpn_nms_thresh)
    rank = rank_keys(keys, keep, code_shift, LEVEL_BITS)
    kernel("proposals", "proposal_rois", EXACT)(
        (blocks(b * post_nms_top_n),), (THREADS,),
        (rank, proposals, kept, np.int32(b), np.int32(k), np.int32(post_nms_top_n), idx_mask, rois, roi_img, counts))
    return ProposalRois(rois, roi_img, counts)
