"""Image decoding and torchvision's GeneralizedRCNNTransform (normalize, resize, pad) in NumPy."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from ..settings import DetectorSettings, format_canvases, padded_extent


class BadImageError(ValueError):
    """An input that cannot be served as an image; the message says what was wrong."""


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header was read and checked, left for a GPU instance to decode
    (:func:`python_backend.cuda.image.decode_jpegs`).  ``shape`` and ``dtype`` are those of the
    ``[H, W, 3]`` uint8 image it decodes to, so the size and canvas checks take it as an image."""

    data: bytes
    shape: tuple[int, int, int]
    dtype = np.dtype(np.uint8)
    ndim = 3


# JPEGs nvJPEG decodes as Pillow does (YCbCr and grayscale); CMYK and YCCK JPEGs go to Pillow
GPU_JPEG_MODES = ("RGB", "L")


def decode_image(data: bytes, max_pixels: int, min_side: int, defer_jpeg: bool = False) -> np.ndarray | EncodedJpeg:
    """Encoded JPEG/PNG/... bytes -> ``[H, W, 3]`` uint8 RGB.

    Raises :class:`BadImageError` for empty, non-image, truncated or oversized input.  The
    pixel limit is checked from the header, before any pixel is decoded.  With ``defer_jpeg``, a
    JPEG that a GPU decodes (:data:`GPU_JPEG_MODES`, and ending in its end-of-image marker, which
    a truncated file lacks: nvJPEG fills a truncated file's missing rows instead of failing) comes
    back undecoded as an :class:`EncodedJpeg`, checked like a decoded image.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadImageError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise BadImageError("empty input: expected encoded image bytes (JPEG, PNG, ...), got 0 bytes")
    # Our own pixel limit, checked from the header before decoding, replaces Pillow's global
    # one (which warns below and raises above ~89M pixels, whatever max_pixels says).
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        w, h = img.size
        if w * h > max_pixels:
            raise BadImageError(f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")
        if defer_jpeg and img.format == "JPEG" and img.mode in GPU_JPEG_MODES and _ends_with_eoi(data):
            jpeg = EncodedJpeg(bytes(data), (h, w, 3))
            check_image_array(jpeg, max_pixels, min_side)
            return jpeg
        img.load()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"not a decodable image ({len(data)} bytes): no known image format "
                            "(JPEG, PNG, ...) recognized") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(f"corrupt or truncated image ({len(data)} bytes): {e}") from None
    arr = _rgb8(img)
    check_image_array(arr, max_pixels, min_side)
    return arr


# Pillow's modes of one 16-bit sample per pixel (16-bit grayscale PNG and TIFF); older Pillow opens
# 16-bit grayscale PNGs as "I" (32-bit), holding the same 0..65535 values
GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _rgb8(img) -> np.ndarray:
    """A decoded Pillow image -> ``[H, W, 3]`` uint8 RGB, scaled to 8 bits as torchvision does.

    ``torchvision.io.decode_image(mode=RGB)`` gives a 16-bit PNG as uint16, and
    ``transforms.v2.functional.to_dtype(image, torch.uint8, scale=True)`` keeps its high byte
    (``value >> 8``).  Pillow already keeps the high byte of 16-bit colour and gray + alpha
    images, and expands 1, 2 and 4-bit samples to 8 bits as libpng does for torchvision; but its
    ``convert("RGB")`` clips 16-bit grayscale at 255 (a white image), so that one is scaled here.
    32-bit integer and float images (TIFF) have no one 8-bit scale, and torchvision's decoder
    reads neither: they are refused.
    """
    if img.mode in GRAY16_MODES or (img.mode == "I" and img.format == "PNG"):
        gray = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("I", "F"):
        kind = "integer" if img.mode == "I" else "floating-point"
        raise BadImageError(f"a 32-bit {kind} image (Pillow mode {img.mode}) has no 8-bit scale to serve it with: "
                            "save it with 8 or 16 bits per sample (JPEG, PNG)")
    return np.asarray(img.convert("RGB"))


def _ends_with_eoi(data) -> bool:
    """Whether the JPEG ends with its EOI marker (FF D9), trailing zero padding aside.  Entropy-coded
    data can't hold FF D9 (a coded FF byte is followed by 00), but an EXIF thumbnail does, so the
    marker is looked for at the end only; a file with other bytes after it goes to Pillow."""
    return bytes(data[-64:]).rstrip(b"\x00").endswith(b"\xff\xd9")


def check_image_array(image: np.ndarray, max_pixels: int, min_side: int) -> None:
    """Validate a decoded ``[H, W, 3]`` uint8 image (NumPy or CuPy)."""
    if not hasattr(image, "dtype") or not hasattr(image, "shape"):
        raise BadImageError(f"expected an HWC uint8 image array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise BadImageError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise BadImageError(f"expected an HWC image with 3 channels, got shape {list(image.shape)}")
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise BadImageError(f"image of {w}x{h} pixels is smaller than the minimum side of {min_side} pixels")
    if h * w > max_pixels:
        raise BadImageError(f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")


def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear resize (align_corners=False, scale in/out)."""
    scale = np.float32(in_size) / np.float32(out_size)
    # torch's CPU kernel is built with FMA contraction (AVX2/AVX512), so ``scale * (i + 0.5) - 0.5``
    # is rounded to float32 once.  Rounding twice puts the index up to an ulp off (~4e-6 at 32 px),
    # which shows as ~3e-5 in the output; float64 then one cast reproduces the single rounding
    # (the product of two float32 is exact in float64).
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = src - i0.astype(np.float32)
    return i0, i1, np.float32(1) - l1, l1


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``[C, H, W]`` float32 -> ``[C, out_h, out_w]``, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` with the scale recomputed from the sizes."""
    y0, y1, hy0, hy1 = _linear_taps(image.shape[1], out_h)
    x0, x1, wx0, wx1 = _linear_taps(image.shape[2], out_w)
    # torch: h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d)
    rows0 = image[:, y0]
    rows1 = image[:, y1]
    top = wx0 * rows0[:, :, x0] + wx1 * rows0[:, :, x1]
    bottom = wx0 * rows1[:, :, x0] + wx1 * rows1[:, :, x1]
    return (hy0[None, :, None] * top + hy1[None, :, None] * bottom).astype(np.float32)


def transform_image(image: np.ndarray, settings: DetectorSettings) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> normalized, resized ``[3, h, w]`` float32 (GeneralizedRCNNTransform
    order: scale to [0, 1], normalize, then resize)."""
    x = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(settings.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    out_h, out_w = settings.resized_size(*image.shape[:2])
    return resize_bilinear(x, out_h, out_w)


def preprocess_batch(images: list[np.ndarray], settings: DetectorSettings,
                     canvas: tuple[int, int] | None = None):
    """Decoded images -> one canvas batch.

    ``canvas``: the (height, width) to pad onto; None: :func:`batch_canvas`, the smallest of the
    settings' canvases that holds every image.  Returns ``images [B, 3, H, W]`` float32
    zero-padded onto it, ``image_sizes [B, 2]`` (resized h, w) and ``original_sizes [B, 2]``
    float32.  Raises :class:`BadImageError` for an image that is not ``[H, W, 3]`` uint8 within
    the settings' size limits, or that the canvas does not hold once resized (every image is
    checked before any work).
    """
    sizes, originals = batch_sizes(images, settings)
    ch, cw = batch_canvas(sizes, originals, settings, canvas)
    batch = np.zeros((len(images), 3, ch, cw), dtype=np.float32)
    for i, image in enumerate(images):
        h, w = (int(v) for v in sizes[i])
        batch[i, :, :h, :w] = transform_image(image, settings)
    return batch, sizes, originals


def batch_sizes(images, settings: DetectorSettings) -> tuple[np.ndarray, np.ndarray]:
    """Check every image of a batch (:func:`check_image_array`, and that torchvision's resize
    leaves it at least one row and column) and return ``image_sizes [B, 2]`` (resized h, w) and
    ``original_sizes [B, 2]``, float32."""
    sizes = np.zeros((len(images), 2), dtype=np.float32)
    originals = np.zeros((len(images), 2), dtype=np.float32)
    for i, image in enumerate(images):
        check_image_array(image, settings.max_input_pixels, settings.min_input_side)
        oh, ow = image.shape[:2]
        h, w = settings.resized_size(oh, ow)
        if min(h, w) < 1:
            # torchvision's F.interpolate raises "Input and output sizes should be greater than 0"
            raise BadImageError(
                f"image of {oh}x{ow} pixels (height x width) resizes to {h}x{w}: its long side is more than "
                f"max_size={settings.max_size} times its short side, which torchvision's resize can't take either"
            )
        sizes[i] = (h, w)
        originals[i] = (oh, ow)
    return sizes, originals


def batch_canvas(sizes: np.ndarray, originals: np.ndarray, settings: DetectorSettings,
                 canvas: tuple[int, int] | None = None) -> tuple[int, int]:
    """The canvas a batch of resized ``sizes [B, 2]`` (``originals [B, 2]`` before the resize) is
    padded onto: ``canvas`` if given, else the smallest of ``settings.canvases`` (by area, then
    their order) that holds every image's padded extent (torchvision's batch_images: each side
    rounded up to 32).

    Raises :class:`BadImageError` naming the image (or the batch), its sizes as height x width
    (the order ``--canvases`` takes) and the canvases."""
    sizes = np.asarray(sizes).reshape(-1, 2).astype(int)
    originals = np.asarray(originals).reshape(-1, 2).astype(int)
    if not len(sizes):
        raise BadImageError("expected at least one image, got none")
    extents = [(padded_extent(h, settings.size_divisible), padded_extent(w, settings.size_divisible)) for h, w in sizes]
    need = (max(e[0] for e in extents), max(e[1] for e in extents))
    if canvas is None:
        chosen = settings.canvas_for(*need)
        if chosen is not None:
            return chosen
        problem = f"none of the canvases {format_canvases(settings.canvases)} holds it"
        lone = [i for i, e in enumerate(extents) if settings.canvas_for(*e) is None]
    else:
        ch, cw = (int(v) for v in canvas)
        if need[0] <= ch and need[1] <= cw:
            return ch, cw
        problem = f"the {ch}x{cw} canvas does not hold it"
        lone = [i for i, (eh, ew) in enumerate(extents) if eh > ch or ew > cw]
    if lone:
        (oh, ow), (h, w), (eh, ew) = originals[lone[0]], sizes[lone[0]], extents[lone[0]]
        raise BadImageError(
            f"image of {oh}x{ow} pixels (height x width) resizes to {h}x{w} and pads to {eh}x{ew}: {problem}; "
            f"export with --canvases auto (every image fits one of those) or add a canvas of at least {eh}x{ew}"
        )
    raise BadImageError(f"the {len(sizes)} images of this request pad to {need[0]}x{need[1]} together and {problem}; "
                        "each fits a canvas alone: send one image per request")
