"""Images: decoding (the reference's, shared by both paths) and ``preprocess_batch`` of every
backend against torchvision's GeneralizedRCNNTransform (normalize, resize, pad)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from op_cases import (  # noqa: F401  (backend, gpu_backend: fixtures)
    ATOL, MAX_SIZE, MEAN, MIN_SIZE, SMALL_SETTINGS, STD, backend, gpu_backend, host, reference,
)
from python_backend.reference.image import (
    BadImageError, EncodedJpeg, batch_canvas, batch_sizes, check_image_array, decode_image, resize_bilinear,
    transform_image,
)
from python_backend.reference.image import preprocess_batch as reference_preprocess
from python_backend.settings import DetectorSettings, padded_extent, resized_size


IMAGE_SIZES = [
    (480, 640),  # landscape, downscale
    (640, 480),  # portrait, downscale
    (300, 300),  # square
    (5, 7),  # tiny: upscale by ~46, bounded by max_size
    (100, 150),  # upscale
    (1000, 333),  # tall: bounded by max_size
    (256, 320),  # already the target size
    (1, 16),  # one row: torchvision takes it (20 x 320)
    (16, 1),  # one column
]


def torch_image(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1], as torchvision's detection models take it."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_transform_image_matches_generalized_rcnn_transform(size):
    settings = SMALL_SETTINGS
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD)).eval()
    batch, _ = transform([torch_image(image)])
    h, w = batch.image_sizes[0]
    assert settings.resized_size(*size) == (h, w) == resized_size(*size, MIN_SIZE, MAX_SIZE)
    assert tuple(batch.tensors.shape[-2:]) == (padded_extent(h), padded_extent(w))
    out = transform_image(image, settings)
    assert out.shape == (3, h, w) and out.dtype == np.float32
    np.testing.assert_allclose(out, batch.tensors[0, :, :h, :w].numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("in_size, out_size", [
    ((37, 53), (80, 111)), ((480, 640), (240, 320)), ((33, 17), (33, 17)), ((1, 1), (4, 6)),
    ((9, 12), (1, 1)), ((256, 300), (255, 301)), ((7, 5), (322, 230)),
])
def test_resize_bilinear_matches_interpolate(in_size, out_size):
    rng = np.random.default_rng(in_size[0] + out_size[1])
    x = rng.normal(size=(3, *in_size)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x)[None], size=out_size, mode="bilinear", align_corners=False)[0]
    out = resize_bilinear(x, *out_size)
    assert out.shape == (3, *out_size) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-6 * max(1.0, np.abs(x).max()))


@pytest.mark.parametrize("shapes, canvas", [
    ([(480, 640), (5, 7), (300, 400)], (256, 320)),  # landscape: they pad to 256x320 together
    ([(640, 480), (1000, 333)], (320, 256)),  # portrait
    ([(300, 300)], (256, 256)),  # square
])
def test_preprocess_batch_matches_batched_transform(backend, shapes, canvas):
    """Images in one batch against GeneralizedRCNNTransform run on the backend's device (CPU for
    NumPy, CUDA for CuPy), on the smallest canvas that holds them all: bit for bit (the served
    path calls torch's own resize there), and within ATOL of the NumPy reference."""
    settings = SMALL_SETTINGS
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in shapes]
    device = "cuda" if backend.device == "gpu" else "cpu"
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD)).eval()
    with torch.no_grad():  # as evaluation.parity.torchvision_detect: the division on the model's device
        expected, _ = transform([torch.from_numpy(im).to(device).permute(2, 0, 1).float() / 255 for im in images])
    batch, sizes, originals = host(backend, *backend.preprocess_batch(images, settings))
    assert batch.shape == (len(images), 3, *canvas) and batch.dtype == sizes.dtype == originals.dtype == np.float32
    # here each batch's canvas is the padded size torchvision's batch_images gives it
    assert tuple(expected.tensors.shape[-2:]) == canvas
    np.testing.assert_array_equal(sizes, np.array(expected.image_sizes, dtype=np.float32))
    np.testing.assert_array_equal(originals, [im.shape[:2] for im in images])
    np.testing.assert_array_equal(batch, expected.tensors.cpu().numpy())  # padding included: zeros
    np.testing.assert_allclose(batch, reference_preprocess(images, settings)[0], rtol=0, atol=ATOL)


def test_decode_jpegs_takes_torchvision_s_pixels_and_falls_back_to_pillow(monkeypatch):
    """``torch_image.decode_jpegs``, the GPU preprocess's JPEG decoder, here on the CPU device:
    torchvision's ``decode_jpeg`` pixels for every JPEG in one call; where the batched call raises,
    each JPEG alone; where one is refused or comes back in another size, Pillow's pixels for that one;
    and a file Pillow can't read either gets Pillow's error."""
    import torchvision.io

    from python_backend.torch_image import decode_jpegs

    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, size=(30, 44, 3), dtype=np.uint8), rng.integers(0, 256, size=(20, 16, 3),
                                                                                    dtype=np.uint8)]
    data = [encode(a, "JPEG", quality=85) for a in arrays]
    jpegs = [decode_image(d, 50_000_000, 1, defer_jpeg=True) for d in data]
    real = torchvision.io.decode_jpeg
    tv = [real(torch.frombuffer(bytearray(d), dtype=torch.uint8), device="cpu") for d in data]
    got = decode_jpegs(jpegs, "cpu", SMALL_SETTINGS)
    assert all(torch.equal(g, t) for g, t in zip(got, tv))
    pillow = [decode_image(d, 50_000_000, 1) for d in data]

    def batch_fails_second_refused(inp, **kwargs):
        if isinstance(inp, list) or bytes(inp.numpy()) == data[1]:
            raise RuntimeError("refused")
        return real(inp, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", batch_fails_second_refused)
    got = decode_jpegs(jpegs, "cpu", SMALL_SETTINGS)
    assert torch.equal(got[0], tv[0]) and isinstance(got[1], np.ndarray)
    np.testing.assert_array_equal(got[1], pillow[1])
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda inp, **kw: [torch.zeros(3, 2, 2, dtype=torch.uint8)] * 2)
    for g, p in zip(decode_jpegs(jpegs, "cpu", SMALL_SETTINGS), pillow):  # another size than the header's
        np.testing.assert_array_equal(g, p)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", batch_fails_second_refused)
    with pytest.raises(BadImageError, match="not a decodable image"):
        decode_jpegs([jpegs[0], EncodedJpeg(b"not a jpeg", (10, 10, 3))], "cpu", SMALL_SETTINGS)


def test_gpu_preprocess_decodes_jpegs_as_torchvision_does_on_the_gpu(gpu_backend, monkeypatch):
    """JPEGs left encoded (``EncodedJpeg``) are decoded by nvJPEG in one call and transformed bit for
    bit as torchvision transforms ``torchvision.io.decode_jpeg(device="cuda")``'s pixels, next to an
    image decoded already; where nvJPEG fails, Pillow decodes, as without the GPU decoder."""
    import torchvision.io

    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[:180, :240]
    photo = np.stack([yy, xx, (yy + xx) // 2], axis=2).astype(np.uint8) + rng.integers(0, 20, (180, 240, 3), np.uint8)
    # colour and grey, landscape like the raw image, so that one canvas holds the three
    jpegs = [encode(photo, "JPEG", quality=90), encode(photo[:120, :160, 0], "JPEG", quality=80)]
    raw = rng.integers(0, 256, size=(100, 130, 3), dtype=np.uint8)
    images = [decode_image(d, 50_000_000, 1, defer_jpeg=True) for d in jpegs] + [raw]
    assert [type(i) for i in images] == [EncodedJpeg, EncodedJpeg, np.ndarray]
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD)).eval()
    pixels = [torchvision.io.decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), device="cuda",
                                         mode=torchvision.io.ImageReadMode.RGB) for d in jpegs]
    pixels.append(torch.from_numpy(raw).cuda().permute(2, 0, 1))
    with torch.no_grad():
        expected, _ = transform([p.float() / 255 for p in pixels])
    batch, sizes, originals = host(gpu_backend, *gpu_backend.preprocess_batch(images, SMALL_SETTINGS))
    np.testing.assert_array_equal(originals, [[180, 240], [120, 160], [100, 130]])
    np.testing.assert_array_equal(sizes, np.array(expected.image_sizes, dtype=np.float32))
    for i, (h, w) in enumerate(expected.image_sizes):
        np.testing.assert_array_equal(batch[i, :, :h, :w], expected.tensors[i, :, :h, :w].cpu().numpy())
    # nvJPEG refusing every file: Pillow's pixels, as the CPU decoder gives them
    def refuse(*args, **kwargs):
        raise RuntimeError("nvJPEG refused")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    pillow = [decode_image(d, 50_000_000, 1) for d in jpegs] + [raw]
    got = host(gpu_backend, *gpu_backend.preprocess_batch(images, SMALL_SETTINGS))
    want = host(gpu_backend, *gpu_backend.preprocess_batch(pillow, SMALL_SETTINGS))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], batch), "Pillow's and nvJPEG's pixels should differ somewhere"


@pytest.mark.parametrize("image, message", [
    # resizes to 240 x 320, height x width as --canvases takes them
    (np.zeros((480, 640, 3), np.uint8), "image of 480x640 pixels (height x width) resizes to 240x320 and pads to "
                                        "256x320: none of the canvases 256x256 holds it; export with --canvases auto "
                                        "(every image fits one of those) or add a canvas of at least 256x320"),
    (np.zeros((48, 64, 3), np.float32), "expected a uint8 image, got dtype float32"),
    (np.zeros((48, 64), np.uint8), "expected an HWC image with 3 channels, got shape [48, 64]"),
    (np.zeros((48, 64, 4), np.uint8), "3 channels, got shape [48, 64, 4]"),
    (np.zeros((0, 64, 3), np.uint8), "smaller than the minimum side of 1"),
    # torchvision's resize would leave it no row (F.interpolate: "output sizes should be greater than 0")
    (np.zeros((1, 321, 3), np.uint8), "image of 1x321 pixels (height x width) resizes to 0x320: its long side is "
                                      "more than max_size=320 times its short side"),
    ([[0, 0, 0]], "expected an HWC uint8 image array, got list"),
])
def test_preprocess_batch_rejects(backend, image, message):
    """Every image of the batch is checked before any work; a bad one fails the call with
    BadImageError (a ValueError) naming what was wrong."""
    small = DetectorSettings(num_classes=5, canvases=((256, 256),), min_size=MIN_SIZE, max_size=MAX_SIZE)
    good = np.zeros((48, 48, 3), np.uint8)  # resizes to 256 x 256: fits
    with pytest.raises(BadImageError) as err:
        backend.preprocess_batch([good, image], small)
    assert message in str(err.value)


def test_torchvision_rejects_what_leaves_no_row():
    """The image preprocess rejects is one torchvision's own transform fails on."""
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD)).eval()
    transform([torch.rand(3, 1, 320)])  # 1 x 320: resizes to 1 x 320
    with pytest.raises(RuntimeError, match="sizes should be greater than 0"):
        transform([torch.rand(3, 1, 321)])


def test_the_images_of_a_batch_share_one_canvas(backend):
    """A landscape and a portrait image pad to 320x320 together, which no canvas holds: the error
    says each fits alone; a canvas given outright must hold every image."""
    rng = np.random.default_rng(4)
    wide, tall = (rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in ((240, 400), (400, 240)))
    with pytest.raises(BadImageError, match=r"the 2 images of this request pad to 320x320 together and none of the "
                                            r"canvases 256x256,256x320,320x256 holds it; each fits a canvas alone"):
        backend.preprocess_batch([wide, tall], SMALL_SETTINGS)
    batch = host(backend, *backend.preprocess_batch([wide], SMALL_SETTINGS, (320, 320)))[0]
    assert batch.shape == (1, 3, 320, 320) and not batch[:, :, 192:].any() and batch[:, :, :192].any()
    with pytest.raises(BadImageError, match=r"image of 400x240 pixels \(height x width\) resizes to 320x192 and "
                                            r"pads to 320x192: the 256x320 canvas does not hold it"):
        backend.preprocess_batch([wide, tall], SMALL_SETTINGS, (256, 320))


def test_batch_canvas_of_the_image_sizes():
    """The canvas choice from shapes alone (no pixels): square, landscape and portrait images."""
    coco = DetectorSettings(num_classes=91)
    shapes = ((600, 600), (600, 900), (900, 600))
    images = [np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (h, w, 3)) for h, w in shapes]
    sizes, originals = batch_sizes(images, coco)
    assert [batch_canvas(s[None], o[None], coco) for s, o in zip(sizes, originals)] == [
        (800, 800), (800, 1344), (1344, 800)]


def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB pixels, with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("JPEG", "L")])
def test_decode_image_roundtrip(fmt, mode):
    """Grey and RGBA inputs come out as RGB, as the model expects."""
    from PIL import Image

    yy, xx = np.mgrid[:37, :53]
    rgb = np.stack([yy * 6, xx * 4, 255 - yy * 3 - xx * 2], axis=2).astype(np.uint8)  # smooth: JPEG-friendly
    image = np.asarray(Image.fromarray(rgb).convert(mode))
    out = decode_image(encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})), 10_000, 2)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(image).convert("RGB"))
    if fmt == "PNG":
        np.testing.assert_array_equal(out, expected)
    else:
        assert np.abs(out.astype(int) - expected).mean() < 3


def bad_inputs():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    jpeg = encode(image, "JPEG")
    return [
        pytest.param(b"", {}, "empty input", id="empty"),
        pytest.param(rng.bytes(2000), {}, "not a decodable image", id="random-bytes"),
        pytest.param(jpeg[: len(jpeg) // 2], {}, "truncated", id="truncated-jpeg"),
        pytest.param(encode(image, "PNG")[:-40], {}, "truncated", id="truncated-png"),
        pytest.param("not bytes", {}, "expected encoded image bytes, got str", id="str"),
        pytest.param(png_header_only(6000, 6000), {"max_pixels": 1_000_000},
                     "6000x6000 = 36000000 pixels exceeds the limit of 1000000", id="header-over-limit"),
        # Pillow's own bomb limit is lifted: our max_pixels decides, then the missing data is found
        pytest.param(png_header_only(100_000, 100_000), {"max_pixels": 10**12}, "corrupt or truncated image",
                     id="header-huge-allowed-then-truncated"),
        pytest.param(encode(image, "PNG"), {"max_pixels": 1000}, "exceeds the limit of 1000 pixels",
                     id="real-image-over-limit"),
        pytest.param(encode(image[:1, :1], "PNG"), {}, "smaller than the minimum side of 2", id="one-pixel"),
        pytest.param(encode(image[:1], "PNG"), {}, "48x1 pixels is smaller", id="one-row"),
    ]


@pytest.mark.parametrize("defer_jpeg", [False, True], ids=["pillow", "gpu-jpeg"])
@pytest.mark.parametrize("data, limits, message", bad_inputs())
def test_decode_image_rejects(data, limits, message, defer_jpeg):
    """The same errors whether or not JPEGs are left for the GPU: what the header shows is checked
    before deferring, and a truncated JPEG (no end-of-image marker) goes to Pillow, which finds it."""
    kwargs = {"max_pixels": 50_000_000, "min_side": 2, **limits}
    with pytest.raises(BadImageError, match=message.replace("(", r"\(")):
        decode_image(data, defer_jpeg=defer_jpeg, **kwargs)


def _jpeg_with_trailer(trailer: bytes) -> bytes:
    return encode(np.full((40, 60, 3), 90, np.uint8), "JPEG") + trailer


def _cmyk_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("CMYK", (60, 40), (10, 20, 30, 40)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("data, deferred", [
    pytest.param(encode(np.full((40, 60, 3), 90, np.uint8), "JPEG"), True, id="rgb-jpeg"),
    pytest.param(encode(np.full((40, 60), 90, np.uint8), "JPEG"), True, id="grey-jpeg"),
    pytest.param(_jpeg_with_trailer(b"\0" * 10), True, id="jpeg-zero-padded"),
    pytest.param(_jpeg_with_trailer(b"trailing text"), False, id="jpeg-bytes-after-the-end"),
    pytest.param(_cmyk_jpeg(), False, id="cmyk-jpeg"),
    pytest.param(encode(np.full((40, 60, 3), 90, np.uint8), "PNG"), False, id="png"),
])
def test_decode_image_defers_the_jpegs_a_gpu_decodes(data, deferred):
    """With ``defer_jpeg``, a YCbCr or grey JPEG that ends in its end-of-image marker stays encoded,
    with the shape it will decode to; anything else (CMYK, bytes after the marker, other formats)
    is decoded by Pillow as without it."""
    out = decode_image(data, 50_000_000, 2, defer_jpeg=True)
    if deferred:
        assert isinstance(out, EncodedJpeg) and out.data == data and out.shape == (40, 60, 3)
        assert out.dtype == np.uint8 and out.ndim == 3
        np.testing.assert_array_equal(batch_sizes([out], SMALL_SETTINGS)[1], [[40, 60]])
    else:
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, decode_image(data, 50_000_000, 2))


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), np.float32), "expected a uint8 image, got dtype float32"),
    (np.zeros((8, 8), np.uint8), "expected an HWC image with 3 channels, got shape [8, 8]"),
    (np.zeros((8, 8, 4), np.uint8), "3 channels, got shape [8, 8, 4]"),
    (np.zeros((1, 8, 3), np.uint8), "smaller than the minimum side of 2"),
    (np.zeros((100, 100, 3), np.uint8), "exceeds the limit of 5000 pixels"),
])
def test_check_image_array_rejects(image, message):
    with pytest.raises(BadImageError) as err:
        check_image_array(image, max_pixels=5000, min_side=2)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_check_image_array_accepts():
    check_image_array(np.zeros((2, 2500, 3), np.uint8), max_pixels=5000, min_side=2)
