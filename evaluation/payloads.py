"""Test images and request payloads: photographs, textures, generated scenes, decoded and resized
copies, and bad inputs that must each get their own error.

A payload is what one request carries: encoded bytes (the ``fasterrcnn`` ensemble's ``image``) or a
decoded ``[H, W, 3]`` uint8 array (``fasterrcnn_raw``'s ``image_raw``).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# perf_analyzer's decoded images: one shape, so that the dynamic batcher can batch them
RAW_SHAPE = (480, 640)
# What a benchmark request carries, by key: decoded pixels to ``fasterrcnn_raw``, or encoded JPEGs to
# ``fasterrcnn`` at (height, width): a VGA photo, and a 12-megapixel phone photo
INPUT_KINDS = {"raw": "decoded pixels 640x480 (fasterrcnn_raw)", "jpeg": "JPEG 640x480 (fasterrcnn)",
               "jpeg12mp": "JPEG 4000x3000, 12 MP (fasterrcnn)"}
JPEG_SHAPES = {"jpeg": (480, 640), "jpeg12mp": (3000, 4000)}
# sensor-like grain added before encoding a large JPEG: an upscaled photograph alone is smooth and
# compresses to a fraction of what a phone's 12-megapixel JPEG weighs
JPEG_GRAIN_SIGMA = 4.0
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's, no download; landscape or square
SCENE_SIZES = ((480, 640), (600, 800), (384, 512))


def encode(image: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """``[H, W, 3]`` (or ``[H, W]``) uint8 -> encoded bytes in Pillow's ``fmt`` (``options``, e.g.
    ``quality=92``, go to Pillow's ``save``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def textured_image(height: int, width: int, seed: int) -> np.ndarray:
    """A synthetic photo-like ``[H, W, 3]`` uint8 image: smooth colour blobs plus noise, so that no
    two regions tie."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.1, 0.5) * max(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(0, 255, 3)
    img = img / max(img.max(), 1e-6) * 200 + rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def flat_logo(height: int = 480, width: int = 640) -> np.ndarray:
    """A red square and a blue disc on a light grey background: most of the image is flat, so a
    network's scores there come in near-ties (with seeded random weights most of torchvision's 100
    detections lie within 1e-3 of another), and any rounding difference upstream reorders them."""
    img = np.full((height, width, 3), 235, np.uint8)
    img[height // 4:height * 5 // 8, width * 15 // 64:width * 33 // 64] = (200, 30, 30)
    yy, xx = np.mgrid[:height, :width]
    img[(yy - height // 2) ** 2 + (xx - width * 47 // 64) ** 2 < (min(height, width) // 6) ** 2] = (30, 60, 190)
    return img


def _save_all(folder: Path, payloads: dict[str, bytes], suffix: str) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in payloads.items():
        (folder / f"{name}{suffix}").write_bytes(data)
    return payloads


def jpeg_payloads(folder: Path) -> dict[str, bytes]:
    """scikit-image's photographs plus two textures (480x640, 600x800), as JPEG bytes (quality 92),
    also written to ``folder``.  All are landscape or square, so they fit the 800x1344 canvas."""
    import skimage.data
    from PIL import Image

    arrays = {n: getattr(skimage.data, n)() for n in PHOTOGRAPHS}
    arrays["textured_480x640"] = textured_image(480, 640, seed=1)
    arrays["textured_600x800"] = textured_image(600, 800, seed=2)
    rgb = {k: np.asarray(Image.fromarray(v).convert("RGB")) for k, v in arrays.items()}
    return _save_all(Path(folder), {k: encode(v, "JPEG", quality=92) for k, v in rgb.items()}, ".jpg")


def synthetic_payloads(folder: Path, count: int = 24) -> dict[str, bytes]:
    """Held-out generated scenes (:mod:`evaluation.synthetic`: what its trained checkpoint has
    learned, where its detections are confident) as PNG bytes (lossless: the server sees the
    generated pixels), also written to ``folder``."""
    from evaluation.synthetic import HELD_OUT, make_scene

    out = {}
    for i in range(count):
        h, w = SCENE_SIZES[i % len(SCENE_SIZES)]
        out[f"scene{i}_{h}x{w}"] = encode(make_scene(0, HELD_OUT + i, size=(h, w)).image)
    return _save_all(Path(folder), out, ".png")


def decoded(payloads: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Encoded bytes -> ``[H, W, 3]`` uint8, decoded as the served preprocess decodes them (its
    default limits)."""
    from python_backend.reference.image import decode_image
    from python_backend.settings import DetectorSettings

    s = DetectorSettings(num_classes=91)
    return {k: decode_image(v, s.max_input_pixels, s.min_input_side) for k, v in payloads.items()}


def resized(images: dict[str, np.ndarray], shape: tuple[int, int] = RAW_SHAPE) -> dict[str, np.ndarray]:
    """Each image resized (bilinear) to ``shape`` (height, width)."""
    from PIL import Image

    return {k: np.asarray(Image.fromarray(v).resize((shape[1], shape[0]), Image.BILINEAR)) for k, v in images.items()}


def jpegs_at(images: dict[str, np.ndarray], shape: tuple[int, int], quality: int = 92,
             grain_sigma: float = 0.0, seed: int = 0) -> dict[str, bytes]:
    """Each image resized (bilinear) to ``shape`` (height, width), with Gaussian grain of
    ``grain_sigma`` grey levels added (seeded), as JPEG bytes of ``quality``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, image in resized(images, shape).items():
        if grain_sigma > 0:
            noisy = image.astype(np.float32) + rng.normal(0.0, grain_sigma, image.shape).astype(np.float32)
            image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        out[name] = encode(image, "JPEG", quality=quality)
    return out


def perf_payloads(kind: str, photos: dict[str, np.ndarray]) -> list:
    """The payloads perf_analyzer cycles through for an input ``kind`` of :data:`INPUT_KINDS`: the
    photographs as decoded ``[480, 640, 3]`` uint8 arrays (``raw``), or as JPEG bytes at that kind's
    :data:`JPEG_SHAPES` (grain on the 12-megapixel ones)."""
    if kind == "raw":
        return list(resized(photos).values())
    if kind not in JPEG_SHAPES:
        raise ValueError(f"input kind must be one of {', '.join(INPUT_KINDS)}, got {kind!r}")
    shape = JPEG_SHAPES[kind]
    grain = JPEG_GRAIN_SIGMA if shape[0] * shape[1] > 4_000_000 else 0.0
    return list(jpegs_at(photos, shape, grain_sigma=grain).values())


def bad_payloads(good_jpeg: bytes) -> dict[str, bytes]:
    """Encoded inputs the preprocess must refuse: random bytes, empty, a JPEG cut in half, a JPEG with
    2000 random bytes written over it from a third of its length on, a PNG signature alone."""
    rng = np.random.default_rng(0)
    corrupt = bytearray(good_jpeg)
    corrupt[len(corrupt) // 3: len(corrupt) // 3 + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    return {
        "random_bytes": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated_jpeg": good_jpeg[: len(good_jpeg) // 2],
        "corrupt_jpeg": bytes(corrupt),
        "png_header_only": b"\x89PNG\r\n\x1a\n",
    }


def bad_raw_payloads() -> dict[str, np.ndarray]:
    """Decoded inputs the preprocess must refuse: images with no rows or no columns (below any
    minimum side; every non-empty size is an image torchvision resizes)."""
    return {"0x4": np.zeros((0, 4, 3), np.uint8), "4x0": np.zeros((4, 0, 3), np.uint8)}
