"""GeneralizedRCNNTransform (normalize, resize, pad) on the GPU: one CuPy RawKernel launch per image.

Same signature and results as :func:`python_backend.reference.image.preprocess_batch`: images
are decoded on the CPU (Pillow), uploaded as uint8, and ``image.cu`` writes each one's canvas
slot, padding included.  Every step is the same float32 operation in the same order as the NumPy
path (no fused multiply-add), and the bilinear taps are the NumPy path's own
(:func:`~python_backend.reference.image._linear_taps`, computed on the host once per size pair
and kept on the device), so the two agree bit for bit.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ..reference.image import _linear_taps, batch_canvas, batch_sizes
from ..settings import DetectorSettings
from ._modules import EXACT, blocks, kernel, THREADS

TAPS_CACHE = 256  # (device, in, out) size pairs whose taps stay on the device


@functools.lru_cache(maxsize=TAPS_CACHE)
def _device_taps(device: int, in_size: int, out_size: int) -> tuple[cp.ndarray, cp.ndarray]:
    """``([2, out] int32 indices, [2, out] float32 weights)`` of one axis, on ``device``."""
    i0, i1, w0, w1 = _linear_taps(in_size, out_size)
    with cp.cuda.Device(device):
        return (cp.asarray(np.stack([i0, i1]).astype(np.int32)),
                cp.asarray(np.stack([w0, w1]).astype(np.float32)))


@functools.lru_cache(maxsize=8)
def _mean_std(device: int, mean: tuple[float, ...], std: tuple[float, ...]) -> cp.ndarray:
    with cp.cuda.Device(device):
        return cp.asarray(np.asarray(tuple(mean) + tuple(std), dtype=np.float32))


def preprocess_batch(images: list[np.ndarray], settings: DetectorSettings,
                     canvas: tuple[int, int] | None = None):
    """Decoded ``[H, W, 3]`` uint8 images -> canvas batch on the device.

    ``canvas``: as in the NumPy path (None: the smallest of the settings' canvases that holds
    every image).  Returns CuPy ``images [B, 3, H, W]`` float32 zero-padded onto it,
    ``image_sizes [B, 2]`` (resized h, w) and ``original_sizes [B, 2]`` float32.  Raises
    :class:`~python_backend.reference.image.BadImageError` as the NumPy path does (every image is
    checked before any work is queued).
    """
    sizes, originals = batch_sizes(images, settings)
    ch, cw = batch_canvas(sizes, originals, settings, canvas)
    device = cp.cuda.Device().id
    mean_std = _mean_std(device, tuple(settings.image_mean), tuple(settings.image_std))
    resize = kernel("image", "resize_normalize_pad", EXACT)
    batch = cp.empty((len(images), 3, ch, cw), dtype=cp.float32)  # the kernel writes the padding too
    n = 3 * ch * cw
    for i, image in enumerate(images):
        src = cp.ascontiguousarray(cp.asarray(image, dtype=cp.uint8))
        h, w = int(sizes[i, 0]), int(sizes[i, 1])
        ys, hy = _device_taps(device, int(image.shape[0]), h)
        xs, wx = _device_taps(device, int(image.shape[1]), w)
        resize((blocks(n),), (THREADS,), (src, np.int32(image.shape[1]), ys, hy, xs, wx, np.int32(h),
                                          np.int32(w), mean_std, batch[i], np.int32(ch), np.int32(cw)))
    return batch, cp.asarray(sizes), cp.asarray(originals)
