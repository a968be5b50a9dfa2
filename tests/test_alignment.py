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
from evaluation.payloads import encode, flat_logo, textured_image

PHOTOS = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
SYNTHETIC = {  # (height, width)
    "landscape": (240, 400),
    "portrait": (400, 240),
    "square": (300, 300),
    "tiny": (12, 20),
    "wide": (90, 500),
    "1:16": (40, 640),
    "16:1": (640, 40),
    "one row": (1, 10),
    "one column": (10, 1),
}


def _rgb(img):
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)


IMAGES = {**{k: _rgb(v) for k, v in PHOTOS.items()},
          **{k: textured_image(h, w, seed=i) for i, (k, (h, w)) in enumerate(SYNTHETIC.items())},
          "flat logo": flat_logo()}  # near-tied scores: any rounding difference upstream would reorder them


@pytest.fixture(scope="module")
def pipeline(small_export):
    settings, paths = small_export
    return OnnxPipeline(paths["rpn"], paths["header"], settings)


@pytest.fixture(scope="module")
def reference(small_model):
    return {name: torchvision_detect(small_model, img) for name, img in IMAGES.items()}


@pytest.mark.parametrize("name", list(IMAGES))
def test_alone_matches_torchvision(pipeline, reference, name):
    """Each image on the canvas preprocess picks for it (portrait, landscape or square)."""
    (ours,) = pipeline([IMAGES[name]])
    assert_parity(reference[name], ours, f"{name} alone")


def test_batched_with_mixed_sizes_matches_torchvision(pipeline, reference):
    """Differently sized companions in one batch must not change any image's detections: landscape,
    portrait and square images on one 320x320 canvas (the rpn takes any; served batches are on one
    of the settings' canvases each)."""
    order = ["tiny", "astronaut", "portrait", "coffee", "wide", "square"]
    results = pipeline([IMAGES[n] for n in order], canvas=(320, 320))
    for name, ours in zip(order, results):
        assert_parity(reference[name], ours, f"{name} in a batch of {len(order)}")


def test_batch_results_do_not_depend_on_companions(pipeline):
    a = pipeline([IMAGES["chelsea"], IMAGES["tiny"]])[0]
    b = pipeline([IMAGES["rocket"], IMAGES["chelsea"], IMAGES["landscape"]])[1]
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_encoded_png_and_jpeg_inputs(pipeline, small_model):
    """The bytes path decodes like Pillow; JPEG is compared on its own decoded pixels."""
    from PIL import Image
    import io

    jpeg = encode(IMAGES["coffee"], "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    (coffee,) = pipeline.from_bytes([jpeg])
    (portrait,) = pipeline.from_bytes([encode(IMAGES["portrait"], "PNG")])
    assert_parity(torchvision_detect(small_model, decoded), coffee, "coffee.jpg")
    assert_parity(torchvision_detect(small_model, IMAGES["portrait"]), portrait, "portrait.png")


@pytest.mark.parametrize("shapes", [((256, 320), (150, 300)), ((320, 256), (300, 150))], ids=["landscape", "portrait"])
def test_canvas_exactly_filled(pipeline, small_model, shapes):
    """An image whose resized size is exactly its canvas, beside a thinner one of the same orientation."""
    (exact, thin) = (textured_image(h, w, seed=11 + i) for i, (h, w) in enumerate(shapes))
    assert pipeline.settings.resized_size(*shapes[0]) == shapes[0] in pipeline.settings.canvases
    results = pipeline([exact, thin])
    assert_parity(torchvision_detect(small_model, exact), results[0], "exactly the canvas")
    assert_parity(torchvision_detect(small_model, thin), results[1], "thin beside it")


@pytest.mark.coco
def test_coco_weights_match_torchvision(tmp_path):
    """torchvision's COCO weights with the default canvases, when they are in torch's cache."""
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
