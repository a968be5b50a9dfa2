"""Grouped NMS on the GPU: one sort, one bitmask launch and one reduction launch for all images
and all groups (RPN levels or classes) at once.

Tie handling: every caller sorts by a 64-bit key [image | group | descending score | tie-break]
whose tie-break is the input position, so equal scores keep input order.  That is a stable
descending sort, as torchvision's CPU ``nms`` kernel does (``scores.sort(stable=True)``) and as
:func:`python_backend.reference.boxes.nms` does; torchvision's CUDA ``nms`` sorts unstably, so
only its tie-free results can be compared exactly.  A box is suppressed when its fp32 IoU with a
kept box, compared as a double, is strictly greater than the threshold (torchvision CPU), so a
box exactly at the threshold survives.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ..reference.contract import check_nms_inputs
from ._modules import EXACT, THREADS, blocks, kernel

SCORE_BITS = 32


def bits_for(n: int) -> int:
    """Bits that hold the values 0 .. n - 1 (at least 1)."""
    return max(1, int(n - 1).bit_length())


def check_key_bits(total: int, what: str) -> None:
    if total > 64:
        raise ValueError(f"{what} needs a {total}-bit sort key, expected at most 64: "
                         "lower the batch size or the number of boxes per image")


def nms_sorted_segments(sboxes: cp.ndarray, codes: cp.ndarray, seg_off: cp.ndarray, num_segments: int,
                        max_segment: int, ncodes: int, invalid_code: int,
                        iou_threshold: float) -> tuple[cp.ndarray, cp.ndarray]:
    """Greedy NMS inside every group of every segment, groups given by sorted codes.

    Args:
        sboxes: ``[N, 4]`` float32 boxes (x1, y1, x2, y2) in sorted order: segment after segment,
            inside a segment by ascending code, inside a group by descending score.
        codes: ``[N]`` int32 group code of each row, ``0 <= code < ncodes``; rows with
            ``code >= invalid_code`` take no part.
        seg_off: ``[num_segments + 1]`` int32 device offsets of the segments.
        max_segment: an upper bound of the segment lengths (sizes the launch and the mask).
    Returns:
        keep ``[N]`` uint8 (1 = kept) and kept_count ``[num_segments]`` int32.
    """
    n = int(sboxes.shape[0])
    # one memset for everything that must start at zero
    ints = cp.zeros((num_segments * (1 + 2 * ncodes) + (n + 3) // 4,), dtype=cp.int32)
    kept_count = ints[:num_segments]
    bounds = ints[num_segments:num_segments * (1 + 2 * ncodes)].reshape(2, num_segments, ncodes)
    keep = ints[num_segments * (1 + 2 * ncodes):].view(cp.uint8)[:n]
    if n == 0 or max_segment == 0:
        return keep, kept_count
    nb = -(-int(max_segment) // 64)
    if nb * 8 > 48 * 1024:
        raise ValueError(f"segments of {max_segment} boxes exceed the reduction's shared memory "
                         f"(at most {48 * 1024 // 8 * 64} boxes per segment)")
    ngroups = min(invalid_code, ncodes)
    mask = cp.empty((n, nb), dtype=cp.uint64)
    kernel("nms", "nms_mask", EXACT)(
        (nb, nb, num_segments), (64,),
        (sboxes, codes, seg_off, np.int32(nb), np.int32(invalid_code), np.int32(ncodes),
         np.float64(iou_threshold), mask, bounds[0], bounds[1]))
    kernel("nms", "nms_reduce", EXACT)(
        (num_segments * ngroups,), (32,),
        (mask, seg_off, bounds[0], bounds[1], np.int32(nb), np.int32(ncodes), np.int32(ngroups), keep, kept_count),
        shared_mem=nb * 8)
    return keep, kept_count


def rank_keys(keys: cp.ndarray, keep: cp.ndarray, code_shift: int, code_bits: int) -> cp.ndarray:
    """Sorted keys with the code field replaced by 0 (kept) / 1 (not kept), sorted again:
    each segment then starts with its kept rows by descending score, ties by the tie-break."""
    out = cp.empty_like(keys)
    n = int(keys.shape[0])
    if n:
        field = ((1 << code_bits) - 1) << code_shift
        kernel("nms", "rank_keys", EXACT)(
            (blocks(n),), (THREADS,), (keys, keep, np.int64(n), np.int32(code_shift), np.uint64(field), out))
        out.sort()
    return out


def batched_nms(boxes, scores, idxs, iou_threshold: float) -> cp.ndarray:
    """torchvision.ops.batched_nms on the GPU (NMS inside each category ``idxs``).

    Args:
        boxes: ``[N, 4]`` floating (x1, y1, x2, y2), computed in float32.
        scores: ``[N]`` floating.
        idxs: ``[N]`` integer categories.
    Returns:
        int64 indices of the kept boxes by descending score, ties in input order (one host sync
        to size the result).
    Raises:
        ValueError / TypeError for a bad shape or dtype, as :func:`python_backend.reference.boxes.batched_nms`.
    """
    boxes, scores, idxs = cp.asarray(boxes), cp.asarray(scores), cp.asarray(idxs)
    n = check_nms_inputs(boxes, scores, idxs)
    return _batched_nms(boxes, scores, idxs, n, iou_threshold)


def nms(boxes, scores, iou_threshold: float) -> cp.ndarray:
    """torchvision.ops.nms on the GPU: :func:`batched_nms` with one category."""
    boxes, scores = cp.asarray(boxes), cp.asarray(scores)
    n = check_nms_inputs(boxes, scores)
    return _batched_nms(boxes, scores, cp.zeros((n,), dtype=cp.int32), n, iou_threshold)


def _batched_nms(boxes: cp.ndarray, scores: cp.ndarray, idxs: cp.ndarray, n: int, iou_threshold: float) -> cp.ndarray:
    boxes = cp.ascontiguousarray(boxes.astype(cp.float32, copy=False))
    scores = cp.ascontiguousarray(scores.astype(cp.float32, copy=False))
    if n == 0:
        return cp.zeros((0,), dtype=cp.int64)
    _, codes = cp.unique(idxs, return_inverse=True)
    codes = codes.reshape(-1).astype(cp.int32)
    ncodes = int(codes.max()) + 1
    idx_bits, code_bits = bits_for(n), bits_for(ncodes + 1)
    check_key_bits(idx_bits + SCORE_BITS + code_bits, "batched_nms")
    score_shift = idx_bits
    code_shift = score_shift + SCORE_BITS
    keys = cp.empty((n,), dtype=cp.uint64)
    kernel("nms", "generic_keys", EXACT)(
        (blocks(n),), (THREADS,), (scores, codes, np.int64(n), np.int32(code_shift), np.int32(score_shift), keys))
    keys.sort()
    sboxes = cp.empty((n, 4), dtype=cp.float32)
    scodes = cp.empty((n,), dtype=cp.int32)
    kernel("nms", "generic_gather", EXACT)(
        (blocks(n),), (THREADS,),
        (keys, boxes, np.int64(n), np.int32(code_shift), np.uint64((1 << code_bits) - 1),
         np.uint64((1 << idx_bits) - 1), sboxes, scodes))
    seg_off = cp.asarray([0, n], dtype=cp.int32)
    keep, kept = nms_sorted_segments(sboxes, scodes, seg_off, 1, n, ncodes, ncodes, iou_threshold)
    rank = rank_keys(keys, keep, code_shift, code_bits)
    num = int(kept.get()[0])
    return (rank[:num] & np.uint64((1 << idx_bits) - 1)).astype(cp.int64)

