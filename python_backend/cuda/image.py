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

from ..reference.image import EncodedJpeg, batch_canvas, batch_sizes, decode_image
from ..settings import DetectorSettings
from ..torch_image import pad_batch


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


def decode_jpegs(jpegs: list[EncodedJpeg], device: torch.device, settings: DetectorSettings) -> list:
    """Each JPEG decoded to RGB: ``[3, H, W]`` uint8 on ``device`` by nvJPEG
    (``torchvision.io.decode_jpeg``, one call for all), as torchvision decodes on a GPU.

    nvJPEG is the fast path, not the judge: if the call fails, each JPEG is tried alone, and one
    that nvJPEG still refuses (or decodes to another size than its header says) is decoded by
    Pillow, which raises ``BadImageError`` for a file that is really bad.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def tensor(jpeg):
        return torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8)

    try:
        decoded = decode_jpeg([tensor(j) for j in jpegs], device=device, mode=ImageReadMode.RGB)
    except RuntimeError:
        decoded = []
        for j in jpegs:
            try:
                decoded.append(decode_jpeg(tensor(j), device=device, mode=ImageReadMode.RGB))
            except RuntimeError:
                decoded.append(None)
    out = []
    for jpeg, image in zip(jpegs, decoded):
        if image is None or tuple(image.shape) != (3, *jpeg.shape[:2]):
            image = decode_image(jpeg.data, settings.max_input_pixels, settings.min_input_side)
        out.append(image)
    return out
