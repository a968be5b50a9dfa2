"""Multi-level ROIAlign on the GPU: LevelMapper fused with roi_align, one launch.

GPU twin of :func:`python_backend.reference.roi_align.multilevel_roi_align`, taking the image
index and the number of valid rows on the device so that it can follow proposal filtering
without a host round trip.
"""
from __future__ import annotations

import math

import cupy as cp
import numpy as np

from ..settings import SIZE_DIVISIBLE
from ._modules import kernel

CHANNELS_PER_BLOCK = 64  # ROI_CH: a block = one RoI x 64 channels
THREADS_TARGET = 256
# ROI_WIN: floats per channel of the RoI window staged in shared memory; 0 reads taps directly.
# Off by default: staging measured 7x slower than direct reads on the H100 (docs/gpu_kernels.md).
WINDOW = 0


def _options(output_size: int, sampling_ratio: int, window: int) -> tuple[str, ...]:
    cpb = max(1, THREADS_TARGET // (output_size * output_size))
    return (f"-DROI_OUT={output_size}", f"-DROI_SAMPLING={sampling_ratio}", f"-DROI_CPB={cpb}",
            f"-DROI_CH={CHANNELS_PER_BLOCK}", f"-DROI_WIN={int(window)}")


def multilevel_roi_align(features: list[cp.ndarray], rois: cp.ndarray, roi_img: cp.ndarray, num_rois: cp.ndarray,
                         image_sizes: cp.ndarray, strides: tuple[int, ...], output_size: int, sampling_ratio: int,
                         canonical_scale: float = 224, canonical_level: int = 4, eps: float = 1e-6,
                         size_divisible: int = SIZE_DIVISIBLE, window: int = WINDOW) -> cp.ndarray:
    """torchvision MultiScaleRoIAlign for RoIs of several images on canvas-sized FPN maps.

    Args:
        features: 4 levels, each ``[B, C, H/s, W/s]`` float32 (P2..P5).
        rois: ``[R, 4]`` float32 x1 y1 x2 y2 on the resized image.
        roi_img: ``[R]`` int32 image of each RoI.
        num_rois: ``[1]`` int32 device scalar: rows ``>= num_rois[0]`` are skipped (their output
            is unspecified).
        image_sizes: ``[B, 2]`` resized (h, w); each image's extent on a level is that size
            rounded up to ``size_divisible``, divided by the stride.
        strides: strides of the 4 levels, consecutive powers of two, e.g. (4, 8, 16, 32).
        window: stage each RoI's window of the map in shared memory when it holds at most this
            many floats per channel; 0 reads every bilinear tap from global memory (same result).
    Returns:
        ``[R, C, output_size, output_size]`` float32.
    """
    if len(features) != 4 or len(strides) != 4:
        raise ValueError(f"expected 4 feature levels and strides, got {len(features)} and {len(strides)}")
    k_min = int(round(math.log2(strides[0])))
    if tuple(strides) != tuple(2 ** (k_min + i) for i in range(4)):
        raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be positive (adaptive sampling is not supported), got {sampling_ratio}")
    features = [cp.ascontiguousarray(cp.asarray(f, dtype=cp.float32)) for f in features]
    b, c = features[0].shape[:2]
    for f in features:
        if f.ndim != 4 or f.shape[:2] != (b, c):
            raise ValueError(f"every level must be [{b}, {c}, H, W], got {f.shape}")
    rois = cp.ascontiguousarray(cp.asarray(rois, dtype=cp.float32))
    r = int(rois.shape[0])
    out = cp.empty((r, c, output_size, output_size), dtype=cp.float32)
    if r == 0 or c == 0:
        return out
    image_sizes = cp.ascontiguousarray(cp.asarray(image_sizes, dtype=cp.float32))
    if window < 0 or window > 1024:
        raise ValueError(f"window must be in [0, 1024] floats (shared memory), got {window}")
    options = _options(output_size, sampling_ratio, window)
    cpb = max(1, THREADS_TARGET // (output_size * output_size))
    dims = [np.int32(d) for f in features for d in f.shape[2:]]
    kernel("roi_align", "multilevel_roi_align", options)(
        (r, -(-c // CHANNELS_PER_BLOCK)), (output_size * output_size * cpb,),
        (*features, *dims, rois, cp.asarray(roi_img, dtype=cp.int32), cp.asarray(num_rois, dtype=cp.int32),
         image_sizes, np.int32(c), np.int32(size_divisible), np.int32(k_min), np.float32(canonical_scale),
         np.float32(canonical_level), np.float32(eps), out))
    return out
