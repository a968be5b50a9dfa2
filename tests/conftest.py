"""Session fixtures: one small exported model shared by the alignment, config and Triton tests."""
from __future__ import annotations

import pytest

# Small sizes keep CI fast.  min/max sizes are torchvision transform settings; the model and the
# exported artifacts read them from the same model object.  Its canvases are the default ones
# ("auto") of this resize: 256x256, 256x320 (landscape) and 320x256 (portrait), the same logic
# that gives 800x800, 800x1088, 1088x800, 800x1344 and 1344x800 at torchvision's 800/1333.
SMALL = dict(num_classes=91, seed=0, min_size=256, max_size=320)
SMALL_CANVASES = ((256, 256), (256, 320), (320, 256))


@pytest.fixture(scope="session")
def small_model():
    from exporters.loading import random_model

    return random_model(**SMALL)


@pytest.fixture(scope="session")
def small_export(small_model, tmp_path_factory):
    """(settings, {"rpn": path, "header": path}) with the default canvases of the small resize."""
    from exporters.loading import read_class_names, settings_from_model
    from exporters.onnx_export import export_all

    settings = settings_from_model(small_model, "auto", read_class_names(None, 91))
    assert settings.canvases == SMALL_CANVASES
    return settings, export_all(small_model, settings, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def small_traces(small_model, small_export, tmp_path_factory):
    """(settings, {"header": path, "rpn_<h>x<w>": path, "rpn_<h>x<w>_unmasked": path for each
    canvas}) traced on the CPU in fp32, the rpn at each of the default canvases of the small resize,
    with and without extent masks (export_torch's default)."""
    from exporters import torch_export

    settings, _ = small_export
    return settings, torch_export.export_torch(small_model, settings, tmp_path_factory.mktemp("torch"), device="cpu")
