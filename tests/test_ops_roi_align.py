"""LevelMapper and ROIAlign: ``multilevel_roi_align`` of every backend against torchvision's
MultiScaleRoIAlign (and, on the GPU, the NumPy reference), with RoIs across every border,
garbage on the canvas beyond each image, RoIs of several images interleaved, ``num_rois``
and bad inputs; the reference's single-level stage against torchvision.ops.roi_align."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

from op_cases import (  # noqa: F401  (backend: a fixture)
    ATOL, backend, canvas_features, edge_case_rois, host, image_sizes_for, nchw, nhwc, random_boxes, reference,
    tv_multiscale, tv_roi_align,
)
from python_backend.reference.boxes import clip_boxes
from python_backend.reference.roi_align import map_levels, roi_align_level
from python_backend.settings import FPN_STRIDES, padded_extent


def square_rois(sides) -> np.ndarray:
    sides = np.asarray(sides, dtype=np.float32)
    x1 = np.float32(3)
    return np.stack([np.full_like(sides, x1), np.full_like(sides, x1), x1 + sides, x1 + sides], 1)


def pool(backend, features, rois, roi_img, sizes, **kwargs) -> np.ndarray:
    out = backend.ops.multilevel_roi_align(features, rois, roi_img, sizes, FPN_STRIDES, 7, 2, **kwargs)
    out = host(backend, out)
    assert out.dtype == np.float32
    return out


# ---------------------------------------------------------------------------------------
# The reference's stages
# ---------------------------------------------------------------------------------------

def test_map_levels_matches_level_mapper():
    rng = np.random.default_rng(2)
    exact = [224.0 * 2.0 ** k for k in range(-4, 4)]  # sqrt(area) exactly on a level boundary
    sides = []
    for s in exact:
        s32 = np.float32(s)
        sides += [s32, np.nextafter(s32, np.float32(0)), np.nextafter(s32, np.float32(np.inf))]
        # log2(s / 224) + 1e-6 crosses an integer about 6.9e-7 * s below s: step across it.
        sides += list(s32 * (np.float32(1) - np.arange(0, 20, dtype=np.float32) * np.float32(1e-7)))
    rois = np.concatenate([
        square_rois(sides),
        square_rois([0.0, 1e-3, 0.5, 1.0, 1e5]),  # zero-size (log2 0 = -inf), tiny, huge
        np.array([[0, 0, 0, 50], [0, 0, 50, 0]], dtype=np.float32),  # zero area
        random_boxes(rng, 1000, extent=800, max_side=800),
    ])
    lvl = map_levels(rois)
    expected = LevelMapper(2, 5)([torch.from_numpy(rois)]).numpy()
    assert lvl.dtype == np.int64
    np.testing.assert_array_equal(lvl, expected)
    assert set(lvl.tolist()) == {0, 1, 2, 3}
    # sqrt(area) exactly 224 * 2^k lands on level 4 + k, index 2 + k (not one below): eps at work.
    np.testing.assert_array_equal(map_levels(square_rois([112, 224, 448])), [1, 2, 3])


@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_roi_align_level_matches_torchvision(stride):
    rng = np.random.default_rng(stride)
    fh, fw, c = 96 // stride + 3, 128 // stride + 1, 8
    feature = rng.normal(size=(2, c, fh, fw)).astype(np.float32)
    rois = edge_case_rois(rng, fh * stride, fw * stride)
    batch_idx = rng.integers(0, 2, len(rois))
    extents = np.array([[fh, fw], [fh, fw]])
    out = nchw(roi_align_level(nhwc(feature), rois, batch_idx, extents, 1.0 / stride, 7, 2))
    expected = tv_roi_align(feature, rois, batch_idx, 1.0 / stride)
    assert out.shape == (len(rois), c, 7, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
    assert np.abs(expected).max() > 0.1 and (np.abs(expected).reshape(len(rois), -1).max(1) == 0).any()


@pytest.mark.parametrize("garbage", ["large", "nan"])
@pytest.mark.parametrize("stride", [4, 16])
def test_roi_align_level_ignores_canvas_beyond_extent(stride, garbage):
    """The key property: on a canvas, each image samples only its own extent, clamped as
    torchvision clamps at the edge of that image's own (smaller) tensor.  NaN garbage shows
    that nothing beyond the extent is even read (NaN * 0 is NaN)."""
    rng = np.random.default_rng(10 + stride)
    canvas_h, canvas_w, c = 320 // stride, 352 // stride, 4
    extents = np.array([[224 // stride, 352 // stride], [320 // stride, 160 // stride]])
    if garbage == "nan":
        feature = np.full((2, c, canvas_h, canvas_w), np.nan, dtype=np.float32)
    else:
        feature = rng.uniform(-1e4, 1e4, size=(2, c, canvas_h, canvas_w)).astype(np.float32)
    for b, (eh, ew) in enumerate(extents):
        feature[b, :, :eh, :ew] = rng.normal(size=(c, eh, ew))
    rois, batch_idx, expected = [], [], []
    for b, (eh, ew) in enumerate(extents):
        r = edge_case_rois(rng, eh * stride, ew * stride)
        rois.append(r)
        batch_idx.append(np.full(len(r), b))
        cropped = np.ascontiguousarray(feature[b:b + 1, :, :eh, :ew])
        expected.append(tv_roi_align(cropped, r, np.zeros(len(r), dtype=np.int64), 1.0 / stride))
    rois, batch_idx, expected = np.concatenate(rois), np.concatenate(batch_idx), np.concatenate(expected)
    out = nchw(roi_align_level(nhwc(feature), rois, batch_idx, extents, 1.0 / stride, 7, 2))
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
    # Not vacuous: clamping at the canvas edge instead would read the garbage.
    full = np.array([[canvas_h, canvas_w]] * 2)
    with np.errstate(invalid="ignore"):
        unclamped = nchw(roi_align_level(nhwc(feature), rois, batch_idx, full, 1.0 / stride, 7, 2))
    assert not np.allclose(unclamped, expected, rtol=0, atol=1.0)
    assert np.isfinite(out).all()


def test_roi_align_level_empty():
    feature = np.zeros((2, 3, 8, 8), dtype=np.float32)
    out = nchw(roi_align_level(nhwc(feature), np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                               np.array([[8, 8], [8, 8]]), 0.25, 7, 2))
    assert out.shape == (0, 3, 7, 7) and out.dtype == np.float32


# ---------------------------------------------------------------------------------------
# multilevel_roi_align on every backend
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_shape", ["resized", "padded"])
@pytest.mark.parametrize("rois_per_image", [(40, 25), (30, 0), (0, 0)])
def test_matches_multiscale_roi_align(backend, rois_per_image, image_shape):
    """A batch of two images on one canvas; each compared with torchvision's pooler run on
    that image alone, with its own cropped (padded-size) FPN maps.  GeneralizedRCNN passes
    the resized size as image_shapes; the pooler rounds its inferred scales to powers of
    two, so the padded size must give the same scales."""
    rng = np.random.default_rng(sum(rois_per_image))
    canvas, c = (480, 608), 4
    resized = [(450, 600), (150, 201)]  # RoIs reach level 5 (sqrt(area) >= 448) on the big one
    padded = np.array([[padded_extent(h), padded_extent(w)] for h, w in resized])
    features = []
    for s in FPN_STRIDES:
        f = rng.uniform(-1e4, 1e4, size=(2, c, canvas[0] // s, canvas[1] // s)).astype(np.float32)
        for b, (ph, pw) in enumerate(padded):
            f[b, :, :ph // s, :pw // s] = rng.normal(size=(c, ph // s, pw // s))
        features.append(f)
    rois_b = []
    for (h, w), n in zip(resized, rois_per_image):
        r = random_boxes(rng, n, extent=max(h, w), max_side=max(h, w))
        r[: n // 4] = edge_case_rois(rng, h, w)[: n // 4]
        rois_b.append(clip_boxes(r, h, w) if n % 2 else r)
    expected = []
    for b, ((ph, pw), size) in enumerate(zip(padded, resized)):
        x = {str(k): torch.from_numpy(np.ascontiguousarray(f[b:b + 1, :, :ph // s, :pw // s]))
             for k, (f, s) in enumerate(zip(features, FPN_STRIDES))}
        pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        shape = size if image_shape == "resized" else (int(ph), int(pw))
        expected.append(pooler(x, [torch.from_numpy(rois_b[b])], [shape]).numpy())
        assert pooler.scales == [1.0 / s for s in FPN_STRIDES]
    # Interleave the two images' RoIs: roi_img, not position, says which image a RoI is on.
    rois = np.concatenate(rois_b)
    roi_img = np.concatenate([np.full(len(r), b, np.int32) for b, r in enumerate(rois_b)])
    perm = rng.permutation(len(rois))
    out = nchw(pool(backend, [nhwc(f) for f in features], rois[perm], roi_img[perm], np.array(resized, np.float32)))
    assert out.shape == (len(rois), c, 7, 7)
    np.testing.assert_allclose(out[np.argsort(perm)], np.concatenate(expected), rtol=0, atol=ATOL)
    if len(rois) > 50:
        assert set(map_levels(rois).tolist()) == {0, 1, 2, 3}, "not every level was exercised"


@pytest.mark.parametrize("batch, channels", [(1, 16), (3, 32), (2, 100)])
def test_matches_torchvision_on_the_canvas(backend, batch, channels):
    """Realistic image sizes on the 800x1344 canvas, garbage beyond each image's extent,
    channel counts that are and are not multiples of a warp."""
    rng = np.random.default_rng(batch)
    sizes = image_sizes_for(batch)
    feats = canvas_features(rng, batch, channels, sizes)
    rois = [edge_case_rois(rng, h, w, 200) for h, w in sizes]
    roi_img = np.concatenate([np.full(len(r), b, np.int32) for b, r in enumerate(rois)])
    rois = np.concatenate(rois)
    out = pool(backend, feats, rois, roi_img, sizes)
    assert np.abs(out - tv_multiscale(feats, rois, roi_img, sizes)).max() <= ATOL
    assert np.abs(out).max() < 100, "garbage beyond an image's extent was read"
    if backend.name != "numpy":
        ref = reference().ops.multilevel_roi_align(feats, rois, roi_img, sizes, FPN_STRIDES, 7, 2)
        assert np.abs(out - ref).max() <= ATOL


def test_float16_maps_pool_as_their_float32_values(backend):
    """The fp16 rpn's maps arrive as float16 (the CuPy kernel's ROI_HALF variant reads them as
    they are): pooling them gives the bits that pooling the same values in float32 gives, and
    torchvision's pooler on those values within ATOL."""
    rng = np.random.default_rng(11)
    sizes = image_sizes_for(2)
    feats32 = [f.astype(np.float16).astype(np.float32) for f in canvas_features(rng, 2, 40, sizes, garbage=6e4)]
    feats16 = [backend.asarray(f.astype(np.float16)) for f in feats32]
    rois = np.concatenate([edge_case_rois(rng, h, w, 150) for h, w in sizes])
    roi_img = np.repeat(np.arange(2, dtype=np.int32), len(rois) // 2)
    got = pool(backend, feats16, rois, roi_img, sizes)
    np.testing.assert_array_equal(got, pool(backend, feats32, rois, roi_img, sizes))
    assert np.abs(got - tv_multiscale(feats32, rois, roi_img, sizes)).max() <= ATOL
    assert set(map_levels(rois).tolist()) == {0, 1, 2, 3}, "not every level was exercised"


@pytest.mark.parametrize("num_rois", [0, 1, 17])
def test_rows_past_num_rois_are_not_written(backend, num_rois):
    """The contract of ``num_rois`` (the RoI count proposal filtering leaves on the device): rows
    below it are pooled, rows from it on are left as they were.  A NaN sentinel in ``out``
    shows both."""
    rng = np.random.default_rng(5)
    sizes = image_sizes_for(2)
    feats = canvas_features(rng, 2, 8, sizes)
    rois = np.concatenate([edge_case_rois(rng, h, w, 12) for h, w in sizes])
    roi_img = np.repeat(np.arange(2, dtype=np.int32), len(rois) // 2)
    out = backend.asarray(np.full((len(rois), 7, 7, 8), np.nan, np.float32))
    got = pool(backend, feats, rois, roi_img, sizes, num_rois=np.array([num_rois], np.int32), out=out)
    np.testing.assert_array_equal(host(backend, out), got)  # written in place
    expected = tv_multiscale(feats, rois[:num_rois], roi_img[:num_rois], sizes)
    assert np.abs(got[:num_rois] - expected).max(initial=0) <= ATOL
    assert np.isnan(got[num_rois:]).all()
    assert len(rois) > num_rois and np.isfinite(got[:num_rois]).all()


@pytest.mark.parametrize("sampling_ratio", [0, -1])
def test_rejects_adaptive_sampling(backend, sampling_ratio):
    feats = [np.zeros((1, 800 // s, 1344 // s, 4), np.float32) for s in FPN_STRIDES]
    with pytest.raises(ValueError, match="sampling_ratio must be positive"):
        backend.ops.multilevel_roi_align(feats, np.zeros((1, 4), np.float32), np.zeros(1, np.int32),
                                         np.array([[800, 1066]], np.float32), FPN_STRIDES, 7, sampling_ratio)


def bad_roi_align_inputs():
    """(change to a valid call, error, message), in the manner of torchvision's test_ops.py."""
    level = lambda s, c=4, b=2, dtype=np.float32: np.zeros((b, 64 // s, 96 // s, c), dtype)  # noqa: E731
    ok = dict(features=[level(s) for s in FPN_STRIDES], rois=np.zeros((3, 4), np.float32),
              roi_img=np.zeros(3, np.int32), image_sizes=np.array([[64, 96], [60, 90]], np.float32))
    cases = [
        ({"rois": np.zeros((3, 3), np.float32)}, ValueError,
         r"rois should have 4 elements in dimension 1 \(x1, y1, x2, y2\), got shape \(3, 3\)"),
        ({"rois": np.zeros((3, 5), np.float32)}, ValueError, r"rois should have 4 elements .*got shape \(3, 5\)"),
        ({"rois": np.zeros(4, np.float32)}, ValueError, r"rois should be a 2d array \[N, 4\], got 1d"),
        ({"rois": np.zeros((3, 4), np.int64)}, TypeError, "rois should be a floating-point array, got dtype int64"),
        ({"roi_img": np.zeros(2, np.int32)}, ValueError,
         "rois and roi_img should have the same number of elements in dimension 0, got 3 and 2"),
        ({"roi_img": np.zeros(3, np.float32)}, TypeError, "roi_img should be an integer array, got dtype float32"),
        ({"features": [level(s) for s in FPN_STRIDES[:3]]}, ValueError,
         r"features should be a list of one map per stride \(4, 8, 16, 32\), got 3"),
        ({"features": level(4)}, ValueError, "features should be a list of one map per stride"),
        ({"features": [level(4)[0]] + [level(s) for s in FPN_STRIDES[1:]]}, ValueError,
         r"features\[0\] should be \[B, H, W, C\] \(channels last\), got shape \(16, 24, 4\)"),
        ({"features": [level(s, c=4 if s < 16 else 8) for s in FPN_STRIDES]}, ValueError,
         r"features\[2\] should be \[2, H, W, 4\] like features\[0\], got shape \(2, 4, 6, 8\)"),
        ({"features": [level(s, b=1 if s == 32 else 2) for s in FPN_STRIDES]}, ValueError,
         r"features\[3\] should be \[2, H, W, 4\] like features\[0\], got shape \(1, 2, 3, 4\)"),
        ({"features": [level(s, dtype=np.int32) for s in FPN_STRIDES]}, TypeError,
         r"features\[0\] should be a floating-point array, got dtype int32"),
        ({"image_sizes": np.zeros((2, 3), np.float32)}, ValueError,
         r"image_sizes should be \[B, 2\] \(height, width\) per image, got shape \(2, 3\)"),
        ({"image_sizes": np.zeros((3, 2), np.float32)}, ValueError,
         r"image_sizes should have one row per image, \[2, 2\], got shape \(3, 2\)"),
        ({"image_sizes": np.zeros((2, 2), bool)}, TypeError, "image_sizes should be an integer or floating-point"),
        ({"strides": (4, 8, 16, 33)}, ValueError, r"strides should be powers of two.*got \(4, 8, 16, 33\)"),
        ({"num_rois": np.array([1, 2], np.int32)}, ValueError, r"num_rois should be a \[1\] array, got shape \(2,\)"),
        ({"num_rois": np.array([1.0], np.float32)}, TypeError, "num_rois should be an integer array"),
        ({"out": np.zeros((3, 7, 7, 5), np.float32)}, ValueError,
         r"out should be a float32 array of shape \(3, 7, 7, 4\), got float32 \(3, 7, 7, 5\)"),
        ({"output_size": 0}, ValueError, "output_size must be positive, got 0"),
    ]
    return ok, [pytest.param(change, error, message, id=f"{'-'.join(change)}-{i}")
                for i, (change, error, message) in enumerate(cases)]


VALID_CALL, BAD_CALLS = bad_roi_align_inputs()


def test_valid_call_of_the_bad_input_cases_works(backend):
    """The call the bad-input cases start from pools without error (so each case fails for its
    own change only)."""
    args = dict(VALID_CALL)
    out = backend.ops.multilevel_roi_align(args.pop("features"), args.pop("rois"), args.pop("roi_img"),
                                           args.pop("image_sizes"), FPN_STRIDES, 7, 2)
    assert host(backend, out).shape == (3, 7, 7, 4)


@pytest.mark.parametrize("change, error, message", BAD_CALLS)
def test_rejects_bad_input(backend, change, error, message):
    args = {**VALID_CALL, "strides": FPN_STRIDES, "output_size": 7, **change}
    if "out" in args:
        args["out"] = backend.asarray(args["out"])
    with pytest.raises(error, match=message):
        backend.ops.multilevel_roi_align(args.pop("features"), args.pop("rois"), args.pop("roi_img"),
                                         args.pop("image_sizes"), args.pop("strides"), args.pop("output_size"), 2,
                                         **args)


def test_reference_rejects_roi_img_outside_the_batch():
    """The reference checks roi_img's values too (the GPU path does not: that would cost a sync)."""
    args = dict(VALID_CALL)
    with pytest.raises(ValueError, match=r"roi_img should index the 2 images of features, got values in \[0, 2\]"):
        reference().ops.multilevel_roi_align(args["features"], args["rois"], np.array([0, 2, 1], np.int32),
                                             args["image_sizes"], FPN_STRIDES, 7, 2)
