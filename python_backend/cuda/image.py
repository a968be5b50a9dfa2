"""GeneralizedRCNNTransform (normalize, resize, pad) on the GPU with CuPy.

Same signature and results as :func:`python_backend.reference.image.preprocess_batch`: images
are decoded on the CPU (Pillow), then uploaded as uint8 and transformed on the device.  Every
step is the same float32 operation in the same order as the NumPy path, and the bilinear taps
are the NumPy path's own (:func:`~python_backend.reference.image._linear_taps`, computed on the
host: they depend only on the sizes), so the two agree to float32 rounding (~1e-6).
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ..reference.image import _linear_taps, check_fits_canvas
from ..settings import DetectorSettings


def resize_bilinear(image: cp.ndarray, out_h: int, out_w: int) -> cp.ndarray:
    """``[C, H, W]`` float32 -> ``[C, out_h, out_w]``; the NumPy ``resize_bilinear`` on the device."""
    y0, y1, hy0, hy1 = (cp.asarray(a) for a in _linear_taps(image.shape[1], out_h))
    x0, x1, wx0, wx1 = (cp.asarray(a) for a in _linear_taps(image.shape[2], out_w))
    # torch: h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), one rounding per operation as in NumPy
    rows0 = image[:, y0]
    rows1 = image[:, y1]
    top = wx0 * rows0[:, :, x0] + wx1 * rows0[:, :, x1]
    bottom = wx0 * rows1[:, :, x0] + wx1 * rows1[:, :, x1]
    return hy0[None, :, None] * top + hy1[None, :, None] * bottom


def transform_image(image: np.ndarray | cp.ndarray, settings: DetectorSettings) -> cp.ndarray:
    """``[H, W, 3]`` uint8 (host or device) -> normalized, resized ``[3, h, w]`` float32 on the device."""
    x = cp.asarray(image).transpose(2, 0, 1).astype(cp.float32) / np.float32(255)
    mean = cp.asarray(np.asarray(settings.image_mean, dtype=np.float32)[:, None, None])
    std = cp.asarray(np.asarray(settings.image_std, dtype=np.float32)[:, None, None])
    x = (x - mean) / std
    out_h, out_w = settings.resized_size(image.shape[0], image.shape[1])
    return resize_bilinear(x, out_h, out_w)


def preprocess_batch(images: list[np.ndarray], settings: DetectorSettings):
    """Decoded ``[H, W, 3]`` uint8 images -> canvas batch on the device.

    Returns CuPy ``images [B, 3, H, W]`` float32 zero-padded onto the canvas, ``image_sizes [B, 2]``
    (resized h, w) and ``original_sizes [B, 2]`` float32.  Raises
    :class:`~python_backend.reference.image.BadImageError` when a resized image does not fit the
    canvas (checked for every image before any work is queued).
    """
    ch, cw = settings.canvas
    sizes = np.zeros((len(images), 2), dtype=np.float32)
    originals = np.zeros((len(images), 2), dtype=np.float32)
    for i, image in enumerate(images):
        h, w = settings.resized_size(image.shape[0], image.shape[1])
        check_fits_canvas(image.shape[0], image.shape[1], h, w, settings)
        sizes[i] = (h, w)
        originals[i] = image.shape[:2]
    batch = cp.zeros((len(images), 3, ch, cw), dtype=cp.float32)
    for i, image in enumerate(images):
        h, w = int(sizes[i, 0]), int(sizes[i, 1])
        batch[i, :, :h, :w] = transform_image(image, settings)
    return batch, cp.asarray(sizes), cp.asarray(originals)
