"""The JPEG kinds a served decoder must decode as libjpeg does (through Pillow): chroma 4:2:0, 4:2:2
and 4:4:4, progressive, grayscale and CMYK, each from one RGB photograph."""
from __future__ import annotations

import io

import numpy as np

# Pillow's save options per kind: subsampling 2 = 4:2:0, 1 = 4:2:2, 0 = 4:4:4
KINDS = {"4:2:0": dict(subsampling=2), "4:2:2": dict(subsampling=1), "4:4:4": dict(subsampling=0),
         "progressive": dict(progressive=True, subsampling=2), "grayscale": dict(mode="L"),
         "cmyk": dict(mode="CMYK")}


def jpeg(image: np.ndarray, kind: str, quality: int = 90) -> bytes:
    """``[H, W, 3]`` uint8 RGB -> the JPEG bytes of ``kind`` (:data:`KINDS`)."""
    from PIL import Image

    options = dict(KINDS[kind])
    img = Image.fromarray(image).convert(options.pop("mode", "RGB"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    """What a torchvision user decodes: ``PIL.Image.open(f).convert("RGB")``, ``[H, W, 3]`` uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def check_kind(data: bytes, kind: str) -> None:
    """Assert that ``data`` is the JPEG kind it claims (so a test can't pass on a plain 4:2:0 file)."""
    from PIL import Image, JpegImagePlugin

    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    want_mode = {"grayscale": "L", "cmyk": "CMYK"}.get(kind, "RGB")
    assert img.mode == want_mode, (kind, img.mode)
    if kind in ("4:2:0", "4:2:2", "4:4:4"):
        assert JpegImagePlugin.get_sampling(img) == KINDS[kind]["subsampling"], kind
    if kind == "progressive":
        assert img.info.get("progressive") or img.info.get("progression"), img.info
