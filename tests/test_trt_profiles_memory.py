"""The rpn engine's optimization profiles are few (exporters/tensorrt/profiles.py canvas_groups).

Triton's TensorRT backend creates one execution context per profile an instance group lists, and
each context allocates the activation memory of the engine's largest profile (TensorRT's default
``kSTATIC`` allocation), so the rpn config lists one profile per group of canvases (landscape,
portrait), not one per canvas.  docs/docker.md ("Execution contexts and memory") has the estimate.
"""
from __future__ import annotations

import pytest

from exporters.repository import RepositoryOptions, network_config
from exporters.tensorrt.profiles import canvas_groups, optimization_profiles, profile_for
from python_backend import names
from python_backend.settings import DetectorSettings

AUTO = ((800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800))  # CANVASES=auto at 800/1333


def test_the_default_canvases_make_two_profiles():
    assert canvas_groups(AUTO) == [[(800, 800), (800, 1088), (800, 1344)], [(1088, 800), (1344, 800)]]
    settings = DetectorSettings(num_classes=91)
    assert settings.canvases == AUTO
    landscape, portrait = optimization_profiles(settings, 8)[names.RPN]
    assert landscape[names.IMAGES] == ((1, 3, 800, 800), (8, 3, 800, 1344), (8, 3, 800, 1344))
    assert portrait[names.IMAGES] == ((1, 3, 1088, 800), (8, 3, 1344, 800), (8, 3, 1344, 800))
    assert landscape[names.IMAGE_SIZES] == portrait[names.IMAGE_SIZES] == ((1, 2), (8, 2), (8, 2))


def test_every_batch_on_a_canvas_has_exactly_one_profile():
    settings = DetectorSettings(num_classes=91)
    profiles = optimization_profiles(settings, 8)[names.RPN]
    for h, w in AUTO:
        for b in (1, 5, 8):
            shapes = {names.IMAGES: (b, 3, h, w), names.IMAGE_SIZES: (b, 2)}
            assert [i for i, p in enumerate(profiles) if profile_for([p], shapes) == 0] == [int(h > w)]


@pytest.mark.parametrize("canvases, expected", [
    (((800, 1344),), [[(800, 1344)]]),
    (((800, 800), (800, 1344)), [[(800, 800), (800, 1344)]]),
    # a box spanning 800..1088 x 1088..1344 would need more memory than the largest canvas: one each
    (((1088, 1088), (800, 1344)), [[(1088, 1088)], [(800, 1344)]]),
    (((1344, 800), (1088, 1088)), [[(1344, 800)], [(1088, 1088)]]),
])
def test_a_group_never_spans_more_than_the_largest_canvas(canvases, expected):
    assert canvas_groups(canvases) == expected
    largest = max(h * w for h, w in canvases)
    for group in canvas_groups(canvases):
        assert max(h for h, _ in group) * max(w for _, w in group) <= largest


def test_the_rpn_config_lists_one_profile_per_group():
    """One instance group, every profile of the engine listed: two contexts per instance, not five."""
    settings = DetectorSettings(num_classes=91)
    for instances in (1, 2):
        cfg = network_config(names.RPN, settings, RepositoryOptions(target="tensorrt", instances=instances))
        assert [(g.count, list(g.profile)) for g in cfg.instance_group] == [(instances, ["0", "1"])]
    header = network_config(names.HEADER, settings, RepositoryOptions(target="tensorrt"))
    assert [list(g.profile) for g in header.instance_group] == [["0"]]
