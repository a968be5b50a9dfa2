"""The canvas set: every image torchvision takes fits one of the default canvases, the dense work
stays near torchvision's own padded sizes, and one rpn export with dynamic height and width gives
on every canvas what the eager network gives.

Shapes only, where sizes are the question (the canvas choice is preprocess's own
:func:`~python_backend.reference.image.batch_canvas`, torchvision's padded size is its own
``GeneralizedRCNNTransform`` run on meta tensors: shapes without pixels); numbers where values are.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from exporters.loading import random_model, settings_from_model
from exporters.split import RpnNetwork
from exporters.tensorrt.compare import anchor_scaled_atol, proposal_mismatches
from python_backend import names
from python_backend.onnx_session import open_session
from python_backend.reference.image import BadImageError, batch_canvas, batch_sizes
from python_backend.settings import FPN_STRIDES, DetectorSettings

# (height, width): phone and camera photos in both orientations, video frames, and the extremes
# torchvision still takes (its resize leaves every side at least one pixel)
PHOTOS = {
    "landscape 3:2": (4000, 6000), "portrait 2:3": (6000, 4000), "square": (3024, 3024),
    "landscape 4:3": (3024, 4032), "portrait 3:4": (4032, 3024), "16:9": (1080, 1920), "9:16": (1920, 1080),
    "small 4:3": (480, 640), "small 3:4": (640, 480), "small 3:2": (2000, 3000), "small 2:3": (3000, 2000),
    "4k 16:9": (2160, 3840), "4k 9:16": (3840, 2160), "square 1080": (1080, 1080),
}
EXTREMES = {"1:16": (100, 1600), "16:1": (1600, 100), "tiny": (20, 20), "1x1": (1, 1), "1xN": (1, 300),
            "Nx1": (300, 1), "1x16": (1, 16), "16x1": (16, 1), "large": (6000, 4000), "wide large": (4000, 6000)}
# the longest line at 800/1333 (one pixel more and the resize leaves no row)
LINES = {"1x1333": (1, 1333), "1333x1": (1333, 1)}
SMALL = DetectorSettings(num_classes=91, min_size=256, max_size=320)  # the test model's resize


def _image(height: int, width: int) -> np.ndarray:
    """An HWC uint8 image of that shape without its pixels' memory (preprocess reads the shape)."""
    return np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3))


def chosen_canvas(settings: DetectorSettings, height: int, width: int) -> tuple[int, int]:
    """The canvas preprocess pads a request of one such image onto."""
    return batch_canvas(*batch_sizes([_image(height, width)], settings), settings)


def torchvision_padded(settings: DetectorSettings, height: int, width: int) -> tuple[int, int]:
    """torchvision's own padded size for the image alone: GeneralizedRCNNTransform's batch of one."""
    transform = GeneralizedRCNNTransform(settings.min_size, settings.max_size, list(settings.image_mean),
                                         list(settings.image_std)).eval()
    batch, _ = transform([torch.empty(3, height, width, device="meta")])
    return tuple(int(d) for d in batch.tensors.shape[-2:])


@pytest.fixture(scope="module")
def default_settings():
    """The default export's settings, read from a torchvision model object (800/1333)."""
    return settings_from_model(random_model(num_classes=91), "auto")


def test_the_default_export_has_five_canvases(default_settings):
    assert (default_settings.min_size, default_settings.max_size) == (800, 1333)
    assert default_settings.canvases == ((800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800))


@pytest.mark.parametrize("sizes, name", [("default", n) for n in (*PHOTOS, *EXTREMES, *LINES)]
                         + [("small", n) for n in (*PHOTOS, *EXTREMES)])
def test_every_image_torchvision_takes_gets_a_canvas(default_settings, sizes, name):
    """No canvas error with the default canvases: each image's canvas holds torchvision's padded
    size of it (at 800/1333 and at the small test model's 256/320)."""
    settings = default_settings if sizes == "default" else SMALL
    h, w = {**PHOTOS, **EXTREMES, **LINES}[name]
    canvas = chosen_canvas(settings, h, w)
    assert canvas in settings.canvases
    ph, pw = torchvision_padded(settings, h, w)
    assert ph <= canvas[0] and pw <= canvas[1], f"{name}: torchvision pads to {ph}x{pw}, canvas {canvas}"


def test_dense_work_stays_near_torchvisions(default_settings):
    """The rpn's dense work per image is its canvas's area: summed over a mix of photo shapes it is
    within 1.15x of torchvision's own padded sizes (one 1344x1344 canvas would be 1.78x here)."""
    ours = sum(np.prod(chosen_canvas(default_settings, *s)) for s in PHOTOS.values())
    theirs = sum(np.prod(torchvision_padded(default_settings, *s)) for s in PHOTOS.values())
    assert ours / theirs <= 1.15, ours / theirs
    square = sum(1344 * 1344 for _ in PHOTOS)
    assert square / theirs > 1.7


def test_an_image_no_custom_canvas_holds_is_a_clear_error():
    """With a custom list (landscape only) a portrait photo fits none; the size advice is in the
    order --canvases takes (height x width)."""
    settings = DetectorSettings(num_classes=91, canvases=((800, 1344),))
    with pytest.raises(BadImageError) as err:
        chosen_canvas(settings, 900, 600)
    assert str(err.value) == ("image of 900x600 pixels (height x width) resizes to 1200x800 and pads to 1216x800: "
                              "none of the canvases 800x1344 holds it; export with --canvases auto (every image fits "
                              "one of those) or add a canvas of at least 1216x800")
    with pytest.raises(BadImageError, match=r"image of 1x1334 pixels \(height x width\) resizes to 0x1333"):
        chosen_canvas(DetectorSettings(num_classes=91), 1, 1334)  # no row left: torchvision fails on it too


# --- one ONNX export, every canvas --------------------------------------------------------------

@pytest.fixture(scope="module")
def eager_rpn(small_model, small_export):
    settings, _ = small_export
    return RpnNetwork(small_model, settings).eval()


@pytest.mark.parametrize("canvas", [(256, 256), (256, 320), (320, 256), (128, 352)])
def test_one_onnx_export_serves_every_canvas(small_export, eager_rpn, canvas):
    """The rpn ONNX, traced on the smallest canvas with dynamic height and width, gives on each
    canvas (and on a size it was never shown) the FPN maps of the eager network and the same
    valid proposals, compared per image and level as sets (TopK may order near-ties either way)."""
    settings, paths = small_export
    h, w = canvas
    rng = np.random.default_rng(h + w)
    sizes = np.array([[h, w], [max(1, h - 70), max(1, w - 100)]], np.float32)
    images = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    for i, (ih, iw) in enumerate(sizes.astype(int)):  # zero beyond each image, as preprocess pads
        images[i, :, ih:] = 0
        images[i, :, :, iw:] = 0
    session = open_session(paths[names.RPN])
    got = session.run(None, {names.IMAGES: images, names.IMAGE_SIZES: sizes})
    with torch.no_grad():
        want = [o.numpy() for o in eager_rpn(torch.from_numpy(images), torch.from_numpy(sizes))]
    assert got[0].shape == want[0].shape == (2, settings.num_proposals, 6)
    for name, stride, a, b in zip(names.FEATURES, FPN_STRIDES, got[1:], want[1:]):
        assert a.shape == b.shape == (2, h // stride, w // stride, settings.fpn_channels), name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3, err_msg=name)
    valid = got[0][..., 5] >= 0
    assert valid.sum() > 0 and (valid == (want[0][..., 5] >= 0)).all()
    for i, (ih, iw) in enumerate(sizes):  # every valid box inside its own image
        rows = got[0][i][valid[i]]
        assert (rows[:, 2] <= iw).all() and (rows[:, 3] <= ih).all()
    problems = proposal_mismatches(got[0], want[0], atol=anchor_scaled_atol(eager_rpn.anchor_sizes(), 1e-2, 1e-4, 1e-4),
                                   rtol=1e-4, score_atol=1e-4)
    assert problems == [], "\n".join(problems[:10])
