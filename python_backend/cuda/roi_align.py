"""Multi-level ROIAlign on the GPU: LevelMapper fused with roi_align, one launch, channels last.

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

CHANNEL_THREADS = 32  # ROI_CT: threads along channels (a warp reads 32 consecutive channels)
BIN_THREADS = 4  # ROI_BT: threads along the output bins of one RoI
MIN_BLOCKS = 1  # ROI_MINB: __launch_bounds__ minimum resident blocks per SM


def _options(output_size: int, sampling_ratio: int) -> tuple[str, ...]:
    return (f"-DROI_OUT={output_size}", f"-DROI_SAMPLING={sampling_ratio}", f"-DROI_CT={CHANNEL_THREADS}",
            f"-DROI_BT={BIN_THREADS}", f"-DROI_MINB={MIN_BLOCKS}")


def multilevel_roi_align(features: list[cp.ndarray], rois: cp.ndarray, roi_img: cp.ndarray, num_rois: cp.ndarray,
                         image_sizes: cp.ndarray, strides: tuple[int, ...], output_size: int, sampling_ratio: int,
                         canonical_scale: float = 224, canonical_level: int = 4, eps: float = 1e-6,
                         size_divisible: int = SIZE_DIVISIBLE) -> cp.ndarray:
    """torchvision MultiScaleRoIAlign for RoIs of several images on canvas-sized FPN maps.

    Args:
        features: 4 levels, each ``[B, H/s, W/s, C]`` float32 (P2..P5, channels last).
        rois: ``[R, 4]`` float32 x1 y1 x2 y2 on the resized image.
        roi_img: ``[R]`` int32 image of each RoI.
        num_rois: ``[1]`` int32 device scalar: rows ``>= num_rois[0]`` are skipped (their output
            is unspecified).
        image_sizes: ``[B, 2]`` resized (h, w); each image's extent on a level is that size
            rounded up to ``size_divisible``, divided by the stride.
        strides: strides of the 4 levels, consecutive powers of two, e.g. (4, 8, 16, 32).
    Returns:
        ``[R, output_size, output_size, C]`` float32 (channels last).
    """
    if len(features) != 4 or len(strides) != 4:
        raise ValueError(f"expected 4 feature levels and strides, got {len(features)} and {len(strides)}")
    k_min = int(round(math.log2(strides[0])))
    if tuple(strides) != tuple(2 ** (k_min + i) for i in range(4)):
        raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be positive (adaptive sampling is not supported), got {sampling_ratio}")
    features = [cp.ascontiguousarray(cp.asarray(f, dtype=cp.float32)) for f in features]
    b, c = features[0].shape[0], features[0].shape[3]
    for f in features:
        if f.ndim != 4 or f.shape[0] != b or f.shape[3] != c:
            raise ValueError(f"every level must be [{b}, H, W, {c}] (channels last), got {f.shape}")
    rois = cp.ascontiguousarray(cp.asarray(rois, dtype=cp.float32))
    r = int(rois.shape[0])
    out = cp.empty((r, output_size, output_size, c), dtype=cp.float32)
    if r == 0 or c == 0:
        return out
    image_sizes = cp.ascontiguousarray(cp.asarray(image_sizes, dtype=cp.float32))
    dims = [np.int32(d) for f in features for d in f.shape[1:3]]
    kernel("roi_align", "multilevel_roi_align", _options(output_size, sampling_ratio))(
        (r,), (CHANNEL_THREADS, BIN_THREADS),
        (*features, *dims, rois, cp.asarray(roi_img, dtype=cp.int32), cp.asarray(num_rois, dtype=cp.int32),
         image_sizes, np.int32(c), np.int32(size_divisible), np.int32(k_min), np.float32(canonical_scale),
         np.float32(canonical_level), np.float32(eps), out))
    return out
