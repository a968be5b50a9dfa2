"""Multi-level ROIAlign on the GPU: LevelMapper fused with roi_align, one launch, channels last.

GPU twin of :func:`python_backend.reference.roi_align.multilevel_roi_align`.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ..reference.contract import check_roi_align_inputs
from ..settings import SIZE_DIVISIBLE
from ._modules import kernel

MAX_LEVELS = 6  # the kernel takes up to six maps as pointers f0..f5 (roi_align.cu ROI_MAX_LEVELS)
CHANNEL_THREADS = 32  # ROI_CT: threads along channels (a warp reads 32 consecutive channels)
BIN_THREADS = 4  # ROI_BT: threads along the output bins of one RoI
MIN_BLOCKS = 1  # ROI_MINB: __launch_bounds__ minimum resident blocks per SM


def _options(output_size: int, sampling_ratio: int) -> tuple[str, ...]:
    return (f"-DROI_OUT={output_size}", f"-DROI_SAMPLING={sampling_ratio}", f"-DROI_CT={CHANNEL_THREADS}",
            f"-DROI_BT={BIN_THREADS}", f"-DROI_MINB={MIN_BLOCKS}")


def multilevel_roi_align(features: list[cp.ndarray], rois, roi_img, image_sizes, strides: tuple[int, ...],
                         output_size: int, sampling_ratio: int, canonical_scale: float = 224, canonical_level: int = 4,
                         eps: float = 1e-6, size_divisible: int = SIZE_DIVISIBLE, *, num_rois=None,
                         out: cp.ndarray | None = None) -> cp.ndarray:
    """torchvision MultiScaleRoIAlign for RoIs of several images on canvas-sized FPN maps, in one launch.

    Args as :func:`python_backend.reference.roi_align.multilevel_roi_align` (at most
    :data:`MAX_LEVELS` maps; float16 maps are pooled without a float32 copy), and ``num_rois`` may stay on the device (``ProposalRois.num_rois``), so
    that pooling follows proposal filtering without a host round trip: rows
    ``>= num_rois[0]`` are not written.  ``roi_img`` values are not checked here (that would
    cost a host synchronization); one outside ``[0, B)`` reads outside the maps.
    Returns:
        ``[R, output_size, output_size, C]`` float32 (channels last): ``out`` when given, else
        a new array whose rows past ``num_rois`` are unspecified.
    """
    if isinstance(features, (list, tuple)):
        features = [cp.asarray(f) for f in features]
    rois, roi_img, image_sizes = cp.asarray(rois), cp.asarray(roi_img), cp.asarray(image_sizes)
    num_rois = None if num_rois is None else cp.asarray(num_rois)
    _, c, (k_min, k_max) = check_roi_align_inputs(features, rois, roi_img, image_sizes, strides, output_size,
                                                  sampling_ratio, num_rois, out)
    if len(strides) > MAX_LEVELS:
        raise ValueError(f"the kernel pools at most {MAX_LEVELS} maps, got {len(strides)} strides {tuple(strides)}")
    r = int(rois.shape[0])
    if out is None:
        out = cp.empty((r, output_size, output_size, c), dtype=cp.float32)
    elif not isinstance(out, cp.ndarray) or not out.flags.c_contiguous:
        raise ValueError("out should be a C-contiguous CuPy array")
    if r == 0 or c == 0:
        return out
    # float16 maps (the fp16 rpn's) are read as they are, by the kernel's ROI_HALF variant
    half = all(f.dtype == cp.float16 for f in features)
    features = [cp.ascontiguousarray(f if half else f.astype(cp.float32, copy=False)) for f in features]
    rois = cp.ascontiguousarray(rois.astype(cp.float32, copy=False))
    roi_img = cp.ascontiguousarray(roi_img.astype(cp.int32, copy=False))
    image_sizes = cp.ascontiguousarray(image_sizes.astype(cp.float32, copy=False))
    num_rois = cp.full((1,), r, dtype=cp.int32) if num_rois is None else num_rois.astype(cp.int32, copy=False)
    # unused pointer slots repeat the first map with a 0x1 extent; the kernel never picks them
    spare = MAX_LEVELS - len(features)
    maps = features + [features[0]] * spare
    dims = [np.int32(d) for f in features for d in f.shape[1:3]] + [np.int32(0), np.int32(1)] * spare
    strides_arg = [np.int32(s) for s in strides] + [np.int32(1)] * spare
    options = _options(output_size, sampling_ratio) + (("-DROI_HALF",) if half else ())
    kernel("roi_align", "multilevel_roi_align", options)(
        (r,), (CHANNEL_THREADS, BIN_THREADS),
        (*maps, *dims, *strides_arg, np.int32(len(features)), np.int32(k_max), rois, roi_img, num_rois, image_sizes,
         np.int32(c), np.int32(size_divisible), np.int32(k_min), np.float32(canonical_scale),
         np.float32(canonical_level), np.float32(eps), out))
    return out
