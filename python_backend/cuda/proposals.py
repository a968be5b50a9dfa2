"""RPN proposal filtering for a whole batch on the GPU: four launches, no host synchronization.

GPU twin of :func:`python_backend.reference.detection.filter_proposals`.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ..reference.contract import ProposalRois, check_proposals
from ._modules import EXACT, kernel
from .nms import SCORE_BITS, bits_for, nms_sorted_segments

LEVEL_BITS = 4  # level codes 0..14, 15 = dropped row
INVALID_LEVEL = (1 << LEVEL_BITS) - 1
MAX_PROPOSALS = 8192  # per image: its keys sort in 64 KB of shared memory
SORT_THREADS = 1024


def filter_proposals(proposals, rpn_min_size: float, rpn_score_thresh: float, rpn_nms_thresh: float,
                     post_nms_top_n: int) -> ProposalRois:
    """Proposals of a batch -> RoIs, as :func:`python_backend.reference.detection.filter_proposals`.

    Per image: drop level < 0, boxes with a side < ``rpn_min_size`` and scores < ``rpn_score_thresh``;
    NMS per level at ``rpn_nms_thresh``; keep the ``post_nms_top_n`` best by score, ties in
    input order (``batched_nms(...)[:post_nms_top_n]``).

    Four launches for the whole batch, no host round trip: one block per image sorts the keys
    [level | -score | k] in shared memory; a bitmask launch and a reduction launch run NMS over
    every (image, level) group; one block per image sorts the keys [dropped | -score | k] and
    writes its top n.

    Args:
        proposals: ``[B, K, 6]`` floating rows ``x1 y1 x2 y2 objectness level``, ``K <= 8192``;
            integer levels 0..14 (rpn emits 0..4), -1 for padding.
    Returns:
        :class:`ProposalRois` in buffers of ``B * post_nms_top_n`` rows, counts on the device.
    """
    proposals = cp.asarray(proposals)
    b, k = check_proposals(proposals, post_nms_top_n)
    if k > MAX_PROPOSALS:
        raise ValueError(f"{k} proposals per image, expected at most {MAX_PROPOSALS} (one image sorts in shared memory)")
    proposals = cp.ascontiguousarray(proposals.astype(cp.float32, copy=False))
    post_nms_top_n = int(post_nms_top_n)
    rois = cp.empty((b * post_nms_top_n, 4), dtype=cp.float32)
    roi_img = cp.empty((b * post_nms_top_n,), dtype=cp.int32)
    if b == 0 or k == 0:
        counts = cp.zeros((b + 1,), dtype=cp.int32)
        return ProposalRois(rois, roi_img, counts[:b], counts[b:])
    counts = cp.empty((b + 1,), dtype=cp.int32)  # the kernel writes each image's count, then their sum
    idx_bits = bits_for(k)
    code_shift = idx_bits + SCORE_BITS
    n_pow2 = 1 << max(1, (k - 1).bit_length())
    idx_mask = np.uint64((1 << idx_bits) - 1)
    keys = cp.empty((b * k,), dtype=cp.uint64)
    sboxes = cp.empty((b * k, 4), dtype=cp.float32)
    codes = cp.empty((b * k,), dtype=cp.int32)
    _sort_kernel("proposal_sort", n_pow2)(
        (b,), (SORT_THREADS,),
        (proposals, np.int32(k), np.int32(n_pow2), np.float32(rpn_min_size), np.float32(rpn_score_thresh),
         np.int32(INVALID_LEVEL), np.int32(code_shift), np.int32(idx_bits), idx_mask, keys, sboxes, codes),
        shared_mem=n_pow2 * 8)
    seg_off = _segment_offsets(cp.cuda.Device().id, b, k)
    keep, kept = nms_sorted_segments(sboxes, codes, seg_off, b, k, INVALID_LEVEL + 1, INVALID_LEVEL, rpn_nms_thresh)
    _sort_kernel("proposal_topk", n_pow2)(
        (b,), (SORT_THREADS,),
        (proposals, keys, keep, kept, np.int32(b), np.int32(k), np.int32(n_pow2), np.int32(post_nms_top_n),
         np.int32(code_shift), idx_mask, rois, roi_img, counts),
        shared_mem=n_pow2 * 8)
    return ProposalRois(rois, roi_img, counts[:b], counts[b:])


def _sort_kernel(name: str, n_pow2: int):
    k = kernel("proposals", name, EXACT)
    if n_pow2 * 8 > 48 * 1024:
        k.max_dynamic_shared_size_bytes = n_pow2 * 8  # opt in above 48 KB (sm_70+)
    return k


@functools.lru_cache(maxsize=64)
def _segment_offsets(device: int, b: int, k: int) -> cp.ndarray:
    """[0, K, 2K, ..., BK] int32 on ``device``, built once per (device, B, K)."""
    with cp.cuda.Device(device):
        return cp.arange(0, b * k + 1, k, dtype=cp.int32)
