"""Session fixtures: one small exported model shared by the alignment, config and Triton tests."""
from __future__ import annotations

from pathlib import Path

import pytest

# Small canvases keep CI fast.  min/max sizes are torchvision transform settings; the model
# and the exported artifacts read them from the same model object.
SMALL = dict(num_classes=91, seed=0, min_size=256, max_size=320)
SQUARE_CANVAS = (320, 320)  # every orientation fits
LANDSCAPE_CANVAS = (256, 320)  # like the 800x1344 default: landscape only, exactly-the-canvas images


@pytest.fixture(scope="session")
def small_model():
    from exporters.loading import random_model

    return random_model(**SMALL)


def _export(model, canvas, tmp: Path):
    from exporters.loading import read_class_names, settings_from_model
    from exporters.onnx_export import export_all

    settings = settings_from_model(model, canvas, read_class_names(None, 91))
    return settings, export_all(model, settings, tmp)


@pytest.fixture(scope="session")
def square_export(small_model, tmp_path_factory):
    """(settings, {"rpn": path, "header": path}) on the 320x320 canvas."""
    return _export(small_model, SQUARE_CANVAS, tmp_path_factory.mktemp("onnx_square"))


@pytest.fixture(scope="session")
def landscape_export(small_model, tmp_path_factory):
    return _export(small_model, LANDSCAPE_CANVAS, tmp_path_factory.mktemp("onnx_landscape"))
