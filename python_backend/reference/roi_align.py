"""Multi-level ROIAlign in NumPy: torchvision LevelMapper + roi_align(aligned=False).

Channels last: maps are ``[B, H, W, C]`` and pooled features ``[R, S, S, C]`` (the contract in
python_backend/names.py), which lets the GPU kernel read and write whole cache lines.

The maps' strides are the model's (``DetectorSettings.roi_strides``), as torchvision's
MultiScaleRoIAlign infers them: a RoI's level index is LevelMapper's level minus k_min (log2 of
the first map's stride), clamped to k_max (log2 of the last's), and indexes the list of maps.
Where the strides are not consecutive powers of two, torchvision pools that index's map at that
map's own scale, and a RoI whose index has no map gets zeros (its result tensor starts at zero);
so does this.

Feature maps live on a fixed canvas, but each image only owns the top-left part of it that
torchvision would have allocated for that image alone (its resized size rounded up to 32).
Sampling clamps at that extent, exactly as torchvision's kernel clamps at the edge of a
single-image tensor, so no value from another image's padding is ever read.
"""
from __future__ import annotations

import numpy as np

from ..settings import SIZE_DIVISIBLE
from .contract import check_roi_align_inputs

# RoIs pooled per pass: a pass's four corner arrays (ROIS_PER_PASS x 14 x 14 x 256 float32 at
# sampling ratio 2) stay within a CPU's cache; the results do not depend on it
ROIS_PER_PASS = 8


def map_levels(rois: np.ndarray, canonical_scale: float = 224, canonical_level: int = 4,
               eps: float = 1e-6, k_min: int = 2, k_max: int = 5) -> np.ndarray:
    """torchvision LevelMapper: ``floor(lvl0 + log2(sqrt(area) / s0) + eps)`` clamped to
    ``[k_min, k_max]``, returned as an index from 0 (``k_min``).  ``rois [R, 4] -> [R] int64``."""
    w = rois[:, 2] - rois[:, 0]
    h = rois[:, 3] - rois[:, 1]
    s = np.sqrt((w * h).astype(np.float32))
    with np.errstate(divide="ignore"):
        lvl = np.floor(np.float32(canonical_level) + np.log2(s / np.float32(canonical_scale)) + np.float32(eps))
    lvl = np.clip(lvl, k_min, k_max)
    return (lvl.astype(np.int64) - k_min)


def _axis_samples(start: np.ndarray, bin_size: np.ndarray, pooled: int, grid: int, extent: np.ndarray):
    """Sample coordinates along one axis and their bilinear weights.

    Returns ``lo, hi`` int64 indices ``[R, pooled*grid]``, weights ``w_lo, w_hi`` and a
    validity mask (torchvision zeroes samples outside ``[-1, extent]``)."""
    p = np.arange(pooled, dtype=np.float32)[:, None]
    g = (np.arange(grid, dtype=np.float32) + np.float32(0.5))[None, :]
    # torchvision: start + ph * bin_size + (iy + .5) * bin_size / grid
    coord = (start[:, None, None] + p[None] * bin_size[:, None, None]
             + g[None] * bin_size[:, None, None] / np.float32(grid)).reshape(start.shape[0], -1)
    ext = extent[:, None].astype(np.float32)
    valid = ~((coord < -1.0) | (coord > ext))
    c = np.maximum(coord, np.float32(0))
    lo = c.astype(np.int64)
    at_edge = lo >= extent[:, None] - 1
    lo = np.where(at_edge, extent[:, None] - 1, lo)
    hi = np.where(at_edge, lo, lo + 1)
    c = np.where(at_edge, lo.astype(np.float32), c)
    frac = c - lo.astype(np.float32)
    return lo, hi, np.float32(1) - frac, frac, valid


def roi_align_level(feature: np.ndarray, rois: np.ndarray, batch_idx: np.ndarray, extents: np.ndarray,
                    spatial_scale: float, output_size: int, sampling_ratio: int) -> np.ndarray:
    """ROIAlign (aligned=False) of ``rois [R, 4]`` on one level ``feature [B, H, W, C]``.

    ``extents [B, 2]`` int: each image's valid (height, width) on this level.
    Returns ``[R, output_size, output_size, C]`` float32.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be positive (adaptive sampling is not supported), got {sampling_ratio}")
    r = rois.shape[0]
    c = feature.shape[3]
    if r == 0:
        return np.zeros((0, output_size, output_size, c), dtype=np.float32)
    scale = np.float32(spatial_scale)
    x1 = rois[:, 0] * scale
    y1 = rois[:, 1] * scale
    roi_w = np.maximum(rois[:, 2] * scale - x1, np.float32(1))
    roi_h = np.maximum(rois[:, 3] * scale - y1, np.float32(1))
    bin_w = roi_w / np.float32(output_size)
    bin_h = roi_h / np.float32(output_size)
    ext = extents[batch_idx]
    empty = (ext <= 0).any(axis=1)  # torchvision reads nothing from an empty map: zeros
    ext = np.maximum(ext, 1)
    ylo, yhi, wylo, wyhi, yvalid = _axis_samples(y1, bin_h, output_size, sampling_ratio, ext[:, 0])
    xlo, xhi, wxlo, wxhi, xvalid = _axis_samples(x1, bin_w, output_size, sampling_ratio, ext[:, 1])
    # the four corners' values, gathered as whole rows of C from the flattened map
    height, width = feature.shape[1:3]
    cells = feature.reshape(-1, c)
    rows = batch_idx[:, None, None] * height
    valid = yvalid[:, :, None] & xvalid[:, None, :]
    out = np.zeros((r, ylo.shape[1], xlo.shape[1], c), dtype=np.float32)
    for yi, wy in ((ylo, wylo), (yhi, wyhi)):
        for xi, wx in ((xlo, wxlo), (xhi, wxhi)):
            w = (wy[:, :, None] * wx[:, None, :]) * valid
            corner = np.take(cells, (rows + yi[:, :, None]) * width + xi[:, None, :], axis=0)
            corner *= w[..., None]
            out += corner
    g = sampling_ratio
    out = out.reshape(r, output_size, g, output_size, g, c).sum(axis=(2, 4)) / np.float32(g * g)
    out[empty] = 0
    return out.astype(np.float32)


def multilevel_roi_align(features: list[np.ndarray], rois, roi_img, image_sizes, strides: tuple[int, ...],
                         output_size: int, sampling_ratio: int, canonical_scale: float = 224, canonical_level: int = 4,
                         eps: float = 1e-6, size_divisible: int = SIZE_DIVISIBLE, *, num_rois=None,
                         out: np.ndarray | None = None) -> np.ndarray:
    """torchvision MultiScaleRoIAlign for RoIs of several images on canvas-sized FPN maps.

    Args:
        features: per level ``[B, H/s, W/s, C]`` floating (P2..P5, channels last).
        rois: ``[R, 4]`` floating x1 y1 x2 y2 on the resized image.
        roi_img: ``[R]`` integer image of each RoI, in ``[0, B)``.
        image_sizes: ``[B, 2]`` resized (h, w); each image's extent on a level is that size
            rounded up to ``size_divisible`` (torchvision batch_images), divided by the stride.
        strides: stride of each map, powers of two in non-decreasing order, e.g. (4, 8, 16, 32)
            (resnet50_fpn's P2..P5), (32, 32) (mobilenet_v3_large_fpn's) or (4, 8, 16, 16) (a
            dilated last stage's).
        num_rois: optional ``[1]`` integer: only rows ``< num_rois[0]`` are pooled, the rest of
            the output is not written.
        out: optional ``[R, output_size, output_size, C]`` float32 to write into.
    Returns:
        ``[R, output_size, output_size, C]`` float32 (``out`` when given; rows not written are zero
        in a new array).
    """
    features = [np.asarray(f) for f in features] if isinstance(features, (list, tuple)) else features
    rois, roi_img, image_sizes = np.asarray(rois), np.asarray(roi_img), np.asarray(image_sizes)
    b, c, (k_min, k_max) = check_roi_align_inputs(features, rois, roi_img, image_sizes, strides, output_size, sampling_ratio,
                                         None if num_rois is None else np.asarray(num_rois), out)
    features = [np.ascontiguousarray(f, dtype=np.float32) for f in features]  # rows of C (roi_align_level)
    r = rois.shape[0]
    n = r if num_rois is None else max(0, min(r, int(np.asarray(num_rois)[0])))
    if out is None:
        out = np.zeros((r, output_size, output_size, c), dtype=np.float32)
    rois = rois[:n].astype(np.float32, copy=False)
    roi_img = roi_img[:n].astype(np.int64)
    if n and (roi_img.min() < 0 or roi_img.max() >= b):
        raise ValueError(f"roi_img should index the {b} images of features, got values in "
                         f"[{roi_img.min()}, {roi_img.max()}]")
    sd = int(size_divisible)
    padded = (image_sizes.astype(np.int64) + sd - 1) // sd * sd
    levels = map_levels(rois, canonical_scale, canonical_level, eps, k_min, k_max)
    # a level index past the last map (strides with gaps): torchvision leaves those rows zero
    out[:n][levels >= len(features)] = 0
    for level, (feature, stride) in enumerate(zip(features, strides)):
        # an image's cells on this map: ceil(padded / stride) (settings.level_grid), as the
        # backbone's stride-2 steps round up beyond size_divisible
        extents = np.minimum(-(-padded // int(stride)), np.array(feature.shape[1:3]))
        sel = np.flatnonzero(levels == level)
        for chunk in np.array_split(sel, max(1, -(-sel.size // ROIS_PER_PASS))):
            if chunk.size:
                out[chunk] = roi_align_level(feature, rois[chunk], roi_img[chunk],
                                             extents, 1.0 / stride, output_size, sampling_ratio)
    return out
