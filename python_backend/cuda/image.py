"""GeneralizedRCNNTransform (normalize, resize, pad) for GPU instances, with torch's CUDA kernels.

Same signature and checks as :func:`python_backend.reference.image.preprocess_batch`; decoded
images are uploaded as uint8, JPEGs left encoded (:class:`~python_backend.reference.image.EncodedJpeg`)
are decoded on the GPU by nvJPEG (:func:`decode_jpegs`), and all are transformed by the operations
torchvision's transform runs on a GPU (:mod:`python_backend.torch_image` says why those and not a
kernel of our own), then handed over as CuPy arrays through DLPack, on the current CuPy device.
"""
from __future__ import annotations

import cupy as cp
import numpy as np
import torch

from ..reference.image import EncodedJpeg, batch_canvas, batch_sizes
from ..settings import DetectorSettings
from ..torch_image import decode_jpegs, pad_batch


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
    canvas = batch_canvas(sizes, originals, settings, canvas)
    device = torch.device("cuda", cp.cuda.Device().id)
    jpegs = [i for i, image in enumerate(images) if isinstance(image, EncodedJpeg)]
    if jpegs:
        images = list(images)
        for i, decoded in zip(jpegs, decode_jpegs([images[i] for i in jpegs], device, settings)):
            images[i] = decoded
    batch = pad_batch(images, sizes, canvas, settings, device)
    # CuPy reads the batch on its own stream: the torch kernels writing it must be done
    torch.cuda.current_stream(device).synchronize()
    return cp.from_dlpack(batch), cp.asarray(sizes), cp.asarray(originals)

