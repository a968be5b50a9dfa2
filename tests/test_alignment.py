"""ONNX Runtime rpn -> NumPy steps -> ONNX Runtime header -> NumPy postprocess equals torchvision.

Each image is compared with ``model.eval()([image])`` run on that image alone, both when it is
served alone and when it shares a batch with differently sized companions.
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from evaluation.onnx_pipeline import OnnxPipeline
from evaluation.parity import assert_parity, torchvision_detect
from evaluation.payloads import encode, textured_image
from python_backend.reference.image import BadImageError, preprocess_batch

PHOTOS = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
SYNTHETIC = {  # (height, width)
    "landscape": (240, 400),
    "portrait": (400, 240),
    "square": (300, 300),
    "tiny": (12, 20),
    "wide": (90, 500),
}


def _rgb(img):
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)


IMAGES = {**{k: _rgb(v) for k, v in PHOTOS.items()},
          **{k: textured_image(h, w, seed=i) for i, (k, (h, w)) in enumerate(SYNTHETIC.items())}}


@pytest.fixture(scope="module")
def square(square_export):
    settings, paths = square_export
    return OnnxPipeline(paths["rpn"], paths["header"], settings)


@pytest.fixture(scope="module")
def reference(small_model):
    return {name: torchvision_detect(small_model, img) for name, img in IMAGES.items()}


@pytest.mark.parametrize("name", list(IMAGES))
def test_alone_matches_torchvision(square, reference, name):
    (ours,) = square([IMAGES[name]])
    assert_parity(reference[name], ours, f"{name} alone")


def test_batched_with_mixed_sizes_matches_torchvision(square, reference):
    """Differently sized companions in one batch must not change any image's detections."""
    order = ["tiny", "astronaut", "portrait", "coffee", "wide", "square"]
    results = square([IMAGES[n] for n in order])
    for name, ours in zip(order, results):
        assert_parity(reference[name], ours, f"{name} in a batch of {len(order)}")


def test_batch_results_do_not_depend_on_companions(square):
    a = square([IMAGES["chelsea"], IMAGES["tiny"]])[0]
    b = square([IMAGES["rocket"], IMAGES["chelsea"], IMAGES["landscape"]])[1]
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_encoded_png_and_jpeg_inputs(square, small_model):
    """The bytes path decodes like Pillow; JPEG is compared on its own decoded pixels."""
    from PIL import Image
    import io

    jpeg = encode(IMAGES["coffee"], "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    ours = square.from_bytes([jpeg, encode(IMAGES["portrait"], "PNG")])
    assert_parity(torchvision_detect(small_model, decoded), ours[0], "coffee.jpg")
    assert_parity(torchvision_detect(small_model, IMAGES["portrait"]), ours[1], "portrait.png")


def test_landscape_canvas_exactly_filled(landscape_export, small_model):
    """An image whose resized size is exactly the canvas, and a wide one, on a landscape canvas."""
    settings, paths = landscape_export
    pipe = OnnxPipeline(paths["rpn"], paths["header"], settings)
    exact = textured_image(256, 320, seed=11)
    assert settings.resized_size(256, 320) == settings.canvas
    wide = textured_image(150, 300, seed=12)
    results = pipe([exact, wide])
    assert_parity(torchvision_detect(small_model, exact), results[0], "exactly the canvas")
    assert_parity(torchvision_detect(small_model, wide), results[1], "wide on landscape canvas")


def test_portrait_on_landscape_canvas_is_a_clear_error(landscape_export):
    settings, _ = landscape_export
    with pytest.raises(BadImageError, match=r"does not fit the 320x256 canvas"):
        preprocess_batch([textured_image(400, 240, seed=3)], settings)


@pytest.mark.coco
def test_coco_weights_match_torchvision(tmp_path):
    """torchvision's COCO weights at the default 800x1344 canvas, when they are in torch's cache."""
    from exporters.loading import coco_model, coco_weights_cached, settings_from_model
    from exporters.onnx_export import export_all

    if coco_weights_cached() is None:
        pytest.skip("torchvision's COCO weights are not in torch's cache (this machine can't download them)")
    model = coco_model()
    settings = settings_from_model(model)
    paths = export_all(model, settings, tmp_path)
    pipe = OnnxPipeline(paths["rpn"], paths["header"], settings)
    images = [IMAGES["astronaut"], IMAGES["coffee"]]
    for name, img, ours in zip(("astronaut", "coffee"), images, pipe(images)):
        assert_parity(torchvision_detect(model, img), ours, f"COCO {name}", min_ref=3)
