"""DetectorSettings: the config parameters round trip, bad canvases, and the feature-map sizes
the operators are sized by."""
from __future__ import annotations

import pytest
import torch

from op_cases import tv_model
from python_backend.settings import RPN_STRIDES, DetectorSettings, level_grid


def test_settings_parameters_roundtrip():
    s = DetectorSettings(num_classes=3, canvas_height=640, canvas_width=1024, min_size=600, max_size=1000,
                         box_score_thresh=0.3, rpn_min_size=1e-3, class_names=("__background__", "cat", "dog"))
    params = s.to_parameters()
    assert all(isinstance(v, str) for v in params.values())
    assert DetectorSettings.from_parameters(params) == s
    triton = {k: {"string_value": v} for k, v in params.items()}
    triton["some_other_parameter"] = {"string_value": "ignored"}
    back = DetectorSettings.from_parameters(triton)
    assert back == s and back.image_mean == s.image_mean and isinstance(back.image_mean, tuple)
    assert DetectorSettings.from_parameters({"num_classes": "91"}) == DetectorSettings(num_classes=91)


@pytest.mark.parametrize("height, width, message", [
    (810, 1344, "canvas height must be a multiple of 32 and at least 64, got 810"),
    (800, 1340, "canvas width must be a multiple of 32"),
    (32, 1344, "at least 64, got 32"),
    (0, 1344, "got 0"),
    (800.0, 1344, "got 800.0"),
])
def test_settings_rejects_bad_canvas(height, width, message):
    with pytest.raises(ValueError) as err:
        DetectorSettings(num_classes=5, canvas_height=height, canvas_width=width)
    assert message in str(err.value)


@pytest.mark.parametrize("params, message", [
    ({}, "lack ['num_classes']"),
    ({"num_classes": "1"}, "num_classes must count background"),
    ({"num_classes": "3", "class_names": '["a", "b"]'}, "class_names has 2 entries, expected num_classes=3"),
    ({"num_classes": "5", "canvas_height": "801"}, "multiple of 32"),
])
def test_settings_from_parameters_rejects(params, message):
    with pytest.raises(ValueError) as err:
        DetectorSettings.from_parameters(params)
    assert message in str(err.value)


@pytest.mark.parametrize("padded", [(64, 96), (160, 224), (96, 352)])
def test_level_grid_matches_fpn_feature_maps(padded):
    """level_grid gives the FPN map sizes P2..P6 (P6 'pool' = max-pool k1 s2, so it rounds up)."""
    with torch.no_grad():
        feats = tv_model().backbone(torch.zeros(1, 3, *padded))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    for f, s in zip(feats.values(), RPN_STRIDES):
        assert tuple(f.shape[-2:]) == (level_grid(padded[0], s), level_grid(padded[1], s))
