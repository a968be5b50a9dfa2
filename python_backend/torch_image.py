"""GeneralizedRCNNTransform's normalize, resize and pad with torch's own kernels: the served path.

An image is normalized and resized by the same torch operations torchvision's transform runs
(``(x - mean) / std``, then ``F.interpolate(mode="bilinear", align_corners=False)`` to the resized
size), on the device the instance serves from.  So the pixels the rpn sees are bit for bit the
ones ``model.eval()([image])`` computes on that device type.

Why not a kernel of our own: the NumPy reference (:mod:`python_backend.reference.image`) follows
torch's CPU arithmetic, but torch's CPU and CUDA resize kernels round differently from each
other and between CPU instruction sets (a 1-ulp difference on many pixels).  Random and flat
images have many near-tied scores, and such a difference reorders them (``benchmarks/diagnose_ties.py``
shows the effect on a logo image).  Calling the kernel torchvision calls removes the difference.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .settings import DetectorSettings


@functools.lru_cache(maxsize=16)
def _mean_std(device: str, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # torchvision GeneralizedRCNNTransform.normalize: as_tensor(image_mean)[:, None, None]
    return (torch.as_tensor(mean, dtype=torch.float32, device=device)[:, None, None],
            torch.as_tensor(std, dtype=torch.float32, device=device)[:, None, None])


def pad_batch(images: list, sizes: np.ndarray, canvas: tuple[int, int], settings: DetectorSettings,
              device: str | torch.device) -> torch.Tensor:
    """Decoded images -> ``[B, 3, ch, cw]`` float32 on ``device``: each image normalized, resized to
    its ``sizes[i]`` (h, w) and zero-padded onto ``canvas`` (torchvision's batch_images pads with
    zeros).  An image is ``[H, W, 3]`` uint8 NumPy, or ``[3, H, W]`` uint8 torch as
    ``torchvision.io.decode_jpeg`` gives it."""
    device = torch.device(device)
    mean, std = _mean_std(str(device), tuple(settings.image_mean), tuple(settings.image_std))
    batch = torch.zeros((len(images), 3, int(canvas[0]), int(canvas[1])), dtype=torch.float32, device=device)
    for i, image in enumerate(images):
        h, w = (int(v) for v in sizes[i])
        if isinstance(image, torch.Tensor):
            x = image.to(device)
        else:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True).permute(2, 0, 1)
        x = x.float() / 255  # as a user hands an image to the model
        x = (x - mean) / std
        # the transform's scale_factor with recompute_scale_factor=True is this size's in/out ratio
        batch[i, :, :h, :w] = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return batch


def preprocess_batch(images: list[np.ndarray], settings: DetectorSettings, canvas: tuple[int, int] | None = None):
    """The CPU instances' ``preprocess_batch`` (the NumPy op set's): the signature and checks of
    :func:`python_backend.reference.image.preprocess_batch`, pixels from torch's CPU kernels.

    Returns NumPy ``images [B, 3, H, W]``, ``image_sizes [B, 2]``, ``original_sizes [B, 2]`` float32.
    """
    from .reference.image import batch_canvas, batch_sizes

    sizes, originals = batch_sizes(images, settings)
    canvas = batch_canvas(sizes, originals, settings, canvas)
    return pad_batch(images, sizes, canvas, settings, "cpu").numpy(), sizes, originals


def decode_jpegs(jpegs: list, device: str | torch.device, settings: DetectorSettings) -> list:
    """Each :class:`~python_backend.reference.image.EncodedJpeg` decoded to RGB: ``[3, H, W]``
    uint8 on ``device`` by ``torchvision.io.decode_jpeg`` (one call for all; nvJPEG on a GPU), as
    torchvision decodes there.

    nvJPEG is the fast path, not the judge: if the call fails, each JPEG is tried alone, and one
    that nvJPEG still refuses (or decodes to another size than its header says) is decoded by
    Pillow, which raises ``BadImageError`` for a file that is really bad.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from .reference.image import decode_image

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
