"""Multi-level ROIAlign on the pooled maps of every torchvision Faster R-CNN, not only
resnet50_fpn's P2..P5: each backend against torchvision's MultiScaleRoIAlign, which infers each
map's scale from its shape and maps a RoI to ``level - k_min`` (k_min, k_max from the first and
last map).  Strides that are not consecutive powers of two are torchvision's behaviour too: a
dilated last stage's (4, 8, 16, 16) never reaches its last map, a gap (4, 16) pools index 1 on
the stride-16 map and gives index 2 zeros."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from op_cases import ATOL, backend, edge_case_rois, host, random_boxes  # noqa: F401  (backend: a fixture)
from python_backend.reference.contract import check_strides
from python_backend.reference.roi_align import map_levels
from python_backend.settings import level_grid, padded_extent

STRIDES = {
    "resnet50_fpn": (4, 8, 16, 32),
    "returned_layers_2_3_4": (8, 16, 32),
    "mobilenet_v3_fpn": (32, 32),
    "dilated_layer4": (4, 8, 16, 16),
    "gap": (4, 16),
    "single_map": (16,),
}


def _case(strides, rng, channels=8, canvas=(320, 448), sizes=((300, 420), (130, 250))):
    """Maps on the canvas (garbage beyond each image's padded extent), RoIs of two images."""
    feats = []
    for s in strides:
        f = np.full((len(sizes), level_grid(canvas[0], s), level_grid(canvas[1], s), channels), 1e3, np.float32)
        for b, (h, w) in enumerate(sizes):
            eh, ew = level_grid(padded_extent(h), s), level_grid(padded_extent(w), s)
            f[b, :eh, :ew] = rng.normal(size=(eh, ew, channels))
        feats.append(f)
    rois, roi_img = [], []
    for b, (h, w) in enumerate(sizes):
        r = np.concatenate([edge_case_rois(rng, h, w, 30), random_boxes(rng, 60, extent=max(h, w), max_side=max(h, w))])
        rois.append(r)
        roi_img.append(np.full(len(r), b, np.int32))
    return feats, np.concatenate(rois).astype(np.float32), np.concatenate(roi_img), np.array(sizes, np.float32)


def _torchvision(feats, strides, rois, roi_img, sizes):
    """MultiScaleRoIAlign image by image, on each image's own maps (cropped to its padded extent)."""
    names = [str(i) for i in range(len(strides))]
    out = np.zeros((len(rois), 7, 7, feats[0].shape[3]), np.float32)
    for b, (h, w) in enumerate(sizes.astype(int)):
        pool = MultiScaleRoIAlign(names, 7, 2)
        ph, pw = padded_extent(h), padded_extent(w)
        maps = {n: torch.from_numpy(np.ascontiguousarray(
                    f[b:b + 1, :level_grid(ph, s), :level_grid(pw, s)].transpose(0, 3, 1, 2)))
                for n, f, s in zip(names, feats, strides)}
        sel = np.flatnonzero(roi_img == b)
        got = pool(maps, [torch.from_numpy(rois[sel])], [(int(ph), int(pw))])
        assert pool.scales == [1.0 / s for s in strides]
        out[sel] = got.numpy().transpose(0, 2, 3, 1)
    return out


@pytest.mark.parametrize("name", list(STRIDES))
def test_any_strides_match_multiscale_roi_align(backend, name):
    strides = STRIDES[name]
    rng = np.random.default_rng(len(name))
    feats, rois, roi_img, sizes = _case(strides, rng)
    out = host(backend, backend.ops.multilevel_roi_align(
        [backend.asarray(f) for f in feats], backend.asarray(rois), backend.asarray(roi_img),
        backend.asarray(sizes), strides, 7, 2))
    want = _torchvision(feats, strides, rois, roi_img, sizes)
    assert np.abs(out - want).max() <= ATOL
    assert np.abs(out).max() < 100, "garbage beyond an image's extent was read"
    k_min, k_max = check_strides(strides)
    levels = map_levels(rois, k_min=k_min, k_max=k_max)
    assert levels.max() > 0 or len(strides) == 1 or k_min == k_max, "only one level was exercised"
    if name == "gap":  # index 2 has no map: torchvision's rows stay zero
        assert (levels == 2).any() and not out[levels == 2].any()


def test_rows_without_a_map_are_zeroed_in_out(backend):
    """With ``out`` given (garbage in it), a RoI whose level index has no map gets zeros."""
    strides = STRIDES["gap"]
    feats, rois, roi_img, sizes = _case(strides, np.random.default_rng(3))
    out = backend.asarray(np.full((len(rois), 7, 7, 8), np.nan, np.float32))
    got = host(backend, backend.ops.multilevel_roi_align(
        [backend.asarray(f) for f in feats], backend.asarray(rois), backend.asarray(roi_img),
        backend.asarray(sizes), strides, 7, 2, out=out))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _torchvision(feats, strides, rois, roi_img, sizes), rtol=0, atol=ATOL)


@pytest.mark.parametrize("strides", [(), (4, 8, 12), (8, 4), (0, 4)])
def test_rejects_strides_torchvision_would_not_infer(strides):
    with pytest.raises(ValueError, match=r"strides should be powers of two in non-decreasing order"):
        check_strides(strides)
