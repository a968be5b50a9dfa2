"""The client's inputs: command-line items -> image files -> request payloads, each bad one an error."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .output import error_record

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ImageError(ValueError):
    """One input can't be sent (unreadable, empty, not an image); the message says why."""


def expand_inputs(items: Iterable[str]) -> tuple[list[Path], list[dict]]:
    """Image files, folders (their image files) and globs -> (sorted unique paths, error records).

    An item that yields no file (missing path, empty folder, glob without a match) becomes an
    error record ``{"image": item, "error": ..., "detections": []}``; the other items still count.
    """
    paths: list[Path] = []
    problems: list[dict] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            error = None if found else f"no images in {item} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        elif p.is_file():
            found, error = [p], None  # a file of any name: the user named it
        elif p.exists():
            found, error = [], f"not a regular file: {item}"  # a FIFO or device would block the read
        elif glob.has_magic(item):
            found = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            error = None if found else f"no files match {item}"
        else:
            found, error = [], f"no such file or directory: {item}"
        paths += found
        if error:
            problems.append(error_record(item, error))
    return list(dict.fromkeys(paths)), problems


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image -> HWC uint8 RGB with the server's own decoder and pixel limit (so ``--raw``
    reports a bad file in the same words as the server does); :class:`ImageError` when it fails.
    The minimum side is left to the server, which knows its setting."""
    from python_backend.reference.image import BadImageError
    from python_backend.reference.image import decode_image as decode
    from python_backend.settings import DetectorSettings

    try:
        return decode(data, DetectorSettings.max_input_pixels, min_side=1)
    except BadImageError as e:
        raise ImageError(str(e)) from None


def read_payloads(images: list[Path], raw: bool) -> Iterator:
    """Per image: its bytes, or with ``raw`` its decoded pixels, or the :class:`ImageError` saying
    why it can't be sent (the record that carries it names the file)."""
    for path in images:
        try:
            data = path.read_bytes()
        except OSError as e:
            yield ImageError(f"cannot read the file ({e.strerror or e})")
            continue
        if not data:
            yield ImageError("empty file")
            continue
        try:
            yield decode_image(data) if raw else data
        except ImageError as e:
            yield e
