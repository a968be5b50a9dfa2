"""Inputs of the kernel benchmarks (``benchmarks.bench_cuda_ops``, ``benchmarks.profile_roi_align``):
rpn-like proposals and RoIs at the 800x1344 canvas, drawn from a seeded generator."""
from __future__ import annotations

import numpy as np

from python_backend.settings import FPN_STRIDES

LEVEL_TOPK = (1000, 1000, 1000, 1000, 390)  # proposals per level, P2..P6: 4390 per image
CANVAS = (800, 1344)
STRIDES = tuple(FPN_STRIDES)
# resized image sizes (height, width) that the batch's images cycle through
SIZES = [(800, 1066), (800, 1333), (600, 800), (800, 1200), (512, 700), (800, 1344), (333, 640), (700, 1000)]


def image_sizes(batch: int) -> np.ndarray:
    """``[batch, 2]`` float32 resized sizes, cycling through :data:`SIZES`."""
    return np.array([SIZES[i % len(SIZES)] for i in range(batch)], np.float32)


def make_proposals(cp, rng: np.random.Generator, batch: int):
    """``[B, 4390, 6]`` rows like the rpn's (x1, y1, x2, y2, score, level): boxes clustered around 25
    centres, clipped to each image, by descending score within each level; and the ``[B, 2]`` sizes.
    ``cp``: the array module of the result (CuPy)."""
    out = np.zeros((batch, sum(LEVEL_TOPK), 6), np.float32)
    sizes = image_sizes(batch)
    for b, (h, w) in enumerate(sizes):
        centers = rng.uniform([0, 0], [w, h], size=(25, 2))
        row = 0
        for level, k in enumerate(LEVEL_TOPK):
            side = 16.0 * 2 ** level
            c = centers[rng.integers(0, 25, k)] + rng.normal(0, side / 2, size=(k, 2))
            wh = side * rng.uniform(0.5, 2.0, size=(k, 2))
            boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
            out[b, row:row + k, :4] = boxes
            out[b, row:row + k, 4] = -np.sort(-rng.random(k))
            out[b, row:row + k, 5] = level
            row += k
    return cp.asarray(out), cp.asarray(sizes)


def make_rois(cp, rng: np.random.Generator, sizes: np.ndarray, per_image: int):
    """``per_image`` RoIs inside each image of ``sizes`` (sides log-uniform in [16, 640] pixels, so
    every FPN level gets some): ``rois [R, 4]`` float32 and their image index ``[R]`` int32."""
    rois, img = [], []
    for b, (h, w) in enumerate(sizes):
        side = np.exp(rng.uniform(np.log(16), np.log(640), size=(per_image, 2)))
        xy = rng.uniform(0, 1, size=(per_image, 2)) * np.maximum(np.array([w, h]) - side, 1)
        rois.append(np.concatenate([xy, xy + side], axis=1))
        img.append(np.full(per_image, b, np.int32))
    return cp.asarray(np.concatenate(rois).astype(np.float32)), cp.asarray(np.concatenate(img))


def gather_bytes(rois: np.ndarray, channels: int) -> int:
    """Bytes ROIAlign must gather: for each RoI, every map cell its bilinear taps touch (the RoI's
    window on its FPN level, one cell of margin), x channels x 4 bytes.  RoIs are counted apart,
    so overlap between RoIs (which L2 may serve) is not subtracted: an upper bound of the unique
    bytes, and what the kernel moves through L1."""
    from python_backend.reference.roi_align import map_levels

    stride = np.asarray(STRIDES, np.float32)[map_levels(rois)]
    lo = np.floor(rois[:, :2] / stride[:, None])
    hi = np.floor(rois[:, 2:] / stride[:, None]) + 1
    cells = np.prod(np.maximum(hi - lo + 1, 1), axis=1)
    return int(cells.sum()) * channels * 4
