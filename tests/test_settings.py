"""DetectorSettings: the config parameters round trip, the canvases (default, checked, chosen),
the proposals per level, and the feature-map sizes the operators are sized by."""
from __future__ import annotations

import pytest
import torch

from op_cases import tv_model
from python_backend.settings import (
    RPN_STRIDES, DetectorSettings, default_canvases, format_canvases, level_grid, parse_canvases,
)


def test_settings_parameters_roundtrip():
    s = DetectorSettings(num_classes=3, canvases=((640, 1024), (640, 640)), min_size=600, max_size=1000,
                         box_score_thresh=0.3, rpn_min_size=1e-3, class_names=("__background__", "cat", "dog"))
    params = s.to_parameters()
    assert all(isinstance(v, str) for v in params.values())
    assert params["canvases"] == "[[640, 640], [640, 1024]]"  # sorted by area
    back = DetectorSettings.from_parameters(params)
    assert back == s and back.canvases == ((640, 640), (640, 1024)) and isinstance(back.canvases[0], tuple)
    triton = {k: {"string_value": v} for k, v in params.items()}
    triton["some_other_parameter"] = {"string_value": "ignored"}
    back = DetectorSettings.from_parameters(triton)
    assert back == s and back.image_mean == s.image_mean and isinstance(back.image_mean, tuple)
    assert DetectorSettings.from_parameters({"num_classes": "91"}) == DetectorSettings(num_classes=91)


@pytest.mark.parametrize("canvases, message", [
    (((810, 1344),), "canvas height must be a multiple of 32 and at least 64, got 810"),
    (((800, 800), (800, 1340)), "canvas width must be a multiple of 32"),
    (((32, 1344),), "at least 64, got 32"),
    (((0, 1344),), "got 0"),
    (((800.0, 1344),), "got 800.0"),
    (((800, 1344, 3),), "a canvas must be a (height, width) pair, got (800, 1344, 3)"),
    ((), None),  # empty: the default canvases
    ("800x1344", "a canvas must be a (height, width) pair, got '8'"),
])
def test_settings_rejects_bad_canvases(canvases, message):
    if message is None:
        assert DetectorSettings(num_classes=5, canvases=canvases).canvases == default_canvases(800, 1333)
        return
    with pytest.raises(ValueError) as err:
        DetectorSettings(num_classes=5, canvases=canvases)
    assert message in str(err.value)


def test_default_canvases_of_torchvisions_resize():
    """800/1333: the full landscape and portrait canvases (every image fits one), and the padded
    resized sizes of square, 4:3 and 3:4 images; sorted by area, then height."""
    want = ((800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800))
    assert default_canvases(800, 1333) == DetectorSettings(num_classes=91).canvases == want
    assert default_canvases(256, 320) == ((256, 256), (256, 320), (320, 256))
    assert DetectorSettings(num_classes=91).largest_canvas == (1344, 800)
    assert parse_canvases(format_canvases(want)) == want
    assert format_canvases(want) == "800x800,800x1088,1088x800,800x1344,1344x800"
    assert parse_canvases("800x1344, 800X800") == ((800, 800), (800, 1344))
    with pytest.raises(ValueError, match="canvas 'big' is not HEIGHTxWIDTH such as 800x1344"):
        parse_canvases("800x800,big")


def test_canvas_for_picks_the_smallest_that_holds():
    s = DetectorSettings(num_classes=91)
    assert s.canvas_for(800, 800) == (800, 800)
    assert s.canvas_for(608, 800) == (800, 800)
    assert s.canvas_for(800, 1088) == (800, 1088)
    assert s.canvas_for(1088, 640) == (1088, 800)
    assert s.canvas_for(800, 1120) == (800, 1344)
    assert s.canvas_for(1216, 800) == (1344, 800)
    assert s.canvas_for(1344, 1344) is None
    tie = DetectorSettings(num_classes=91, canvases=((960, 640), (640, 960)))  # equal areas: height first
    assert tie.canvases == ((640, 960), (960, 640)) and tie.canvas_for(640, 640) == (640, 960)


def test_proposals_per_level_are_the_largest_canvas_s():
    """Per level min(pre-NMS top-n, the level's anchors on the canvas with most): 819 on P6 of
    800x1344 (13 x 21 cells x 3 anchors); every other level reaches the top-n."""
    s = DetectorSettings(num_classes=91)
    assert s.rpn_level_topk() == (1000, 1000, 1000, 1000, 13 * 21 * 3) and s.num_proposals == 4819
    small = DetectorSettings(num_classes=91, canvases=((256, 256), (256, 320)))
    assert small.rpn_level_topk() == (1000, 1000, 16 * 20 * 3, 8 * 10 * 3, 4 * 5 * 3)
    assert DetectorSettings(num_classes=91, canvases=((256, 256),), rpn_anchors_per_cell=5).rpn_level_topk()[3] == 320


@pytest.mark.parametrize("params, message", [
    ({}, "lack ['num_classes']"),
    ({"num_classes": "1"}, "num_classes must count background"),
    ({"num_classes": "3", "class_names": '["a", "b"]'}, "class_names has 2 entries, expected num_classes=3"),
    ({"num_classes": "5", "canvases": "[[801, 800]]"}, "multiple of 32"),
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
