"""Images of more than 8 bits per sample: decoded to the 8-bit pixels torchvision gets from
``torchvision.io.decode_image(..., mode=RGB)`` scaled to uint8 (``to_dtype(..., scale=True)``),
on the server's decode path (the preprocess model) and in the client's ``--raw`` path alike; the
32-bit integer and float images that torchvision does not decode are refused with a clear error."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import triton_fake as fake
from exporters.repository import RepositoryOptions, python_step_config
from python_backend import backends, names
from python_backend.reference.image import BadImageError, decode_image
from python_backend.settings import DetectorSettings
from python_backend.triton_models import adapter as adapter_module

SETTINGS = DetectorSettings(num_classes=3, canvases=((64, 64),), min_size=48, max_size=64,
                            rpn_pre_nms_top_n=20, rpn_post_nms_top_n=10, fpn_channels=8, box_detections_per_img=5)
# PNG colour types (PNG specification, IHDR): grayscale, RGB, grayscale + alpha, RGBA
COLOUR_TYPES = {1: 0, 3: 2, 2: 4, 4: 6}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(samples: np.ndarray) -> bytes:
    """``[H, W]`` or ``[H, W, C]`` uint16 -> a 16-bit PNG (Pillow writes 16-bit grayscale only)."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, COLOUR_TYPES[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def torchvision_pixels(data: bytes) -> np.ndarray:
    """``[H, W, 3]`` uint8 as torchvision decodes ``data`` and scales it to 8 bits."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode
    from torchvision.transforms.v2.functional import to_dtype

    decoded = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return to_dtype(decoded, torch.uint8, scale=True).permute(1, 2, 0).numpy()


def _samples(channels: int, seed: int, height: int = 50, width: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    samples = rng.integers(0, 65536, shape, dtype=np.uint16)
    samples.reshape(-1)[:4] = (0, 255, 256, 65535)  # the ends and the first step of the 8-bit scale
    return samples


CASES = {"gray16": 1, "gray_alpha16": 2, "rgb16": 3, "rgba16": 4}


@pytest.mark.parametrize("channels", CASES.values(), ids=CASES.keys())
def test_16_bit_png_decodes_to_torchvisions_8_bit_pixels(channels):
    data = png16(_samples(channels, seed=channels))
    want = torchvision_pixels(data)
    assert torch.uint16 == _tv_dtype(data)  # the case: torchvision sees 16 bits
    assert want.std() > 10  # not a flat (all-white) image
    np.testing.assert_array_equal(decode_image(data, SETTINGS.max_input_pixels, min_side=1), want)


def _tv_dtype(data: bytes):
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).dtype


def test_16_bit_png_on_the_servers_preprocess(monkeypatch):
    """The preprocess model (Pillow decode path) gives the canvas of torchvision's 8-bit pixels."""
    cfg = python_step_config(names.PREPROCESS, SETTINGS, RepositoryOptions(max_batch_size=4))
    model = fake.load_model(Path(adapter_module.__file__).parent / "preprocess.py", monkeypatch)()
    model.initialize(fake.model_args(cfg))
    data = [png16(_samples(1, seed=5)), png16(_samples(3, seed=6, height=40, width=56))]
    requests = [fake.Request(**{names.IMAGE_BYTES: np.frombuffer(d, np.uint8)[None]}) for d in data]
    numpy_steps = backends.get_backend("cpu")
    for response, d in zip(model.execute(requests), data):
        assert not response.has_error(), response.error().message()
        want = numpy_steps.preprocess_batch([torchvision_pixels(d)], SETTINGS)
        for name, expected in zip((names.IMAGES, names.IMAGE_SIZES, names.ORIGINAL_SIZES), want):
            np.testing.assert_array_equal(response.output(name), expected, err_msg=name)


def test_16_bit_png_in_the_clients_raw_path(tmp_path):
    """``detect --raw`` sends the pixels torchvision decodes, scaled to 8 bits."""
    from client.inputs import read_payloads

    path = tmp_path / "depth.png"
    path.write_bytes(png16(_samples(1, seed=7)))
    (pixels,) = read_payloads([path], raw=True)
    np.testing.assert_array_equal(pixels, torchvision_pixels(path.read_bytes()))


@pytest.mark.parametrize("mode, array", [("I", np.full((8, 8), 70000, np.int32)),
                                         ("F", np.full((8, 8), 0.5, np.float32))])
def test_32_bit_images_are_refused_with_a_clear_error(mode, array):
    """32-bit integer and float images (TIFF, say) have no one 8-bit scale; torchvision's decoder
    does not read them either."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    with pytest.raises(BadImageError, match=rf"32-bit .* \(Pillow mode {mode}\).* 8 or 16 bits"):
        decode_image(buf.getvalue(), SETTINGS.max_input_pixels, min_side=1)
