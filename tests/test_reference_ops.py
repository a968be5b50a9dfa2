"""The NumPy reference (``python_backend.reference``) against the torchvision stages it mirrors.

Written in the style of torchvision's ``test/test_ops.py``: every op is compared with
torchvision (CPU, float32) on random inputs at realistic sizes and on edge cases: empty
input, one box, score ties, boxes exactly at the IoU threshold, degenerate boxes, RoIs
across the image border.  Index outputs must be identical; float outputs agree to 1e-5
unless a test says otherwise.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import LevelMapper

from python_backend.reference.boxes import (
    batched_nms, box_area, clip_boxes, decode_boxes, nms, small_box_mask,
)
from python_backend.reference.detection import (
    filter_proposals, pack_detections, postprocess_detections, rescale_boxes,
)
from python_backend.reference.image import (
    BadImageError, check_image_array, decode_image, preprocess_batch, resize_bilinear, transform_image,
)
from python_backend.reference.roi_align import map_levels, multilevel_roi_align, roi_align_level
from python_backend.settings import (
    FPN_STRIDES, RPN_STRIDES, DetectorSettings, level_grid, padded_extent, resized_size,
)

ATOL = 1e-5  # float32 tolerance for values of order 1 (features, images, scores)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Small sizes keep the suite fast; the arithmetic is the same at 800 / 1333.
MIN_SIZE, MAX_SIZE = 256, 320
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@pytest.fixture(scope="module")
def model():
    """An untrained torchvision Faster R-CNN: its rpn, roi_heads and backbone are the references."""
    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    return m.eval()


@pytest.fixture(scope="module")
def settings():
    return DetectorSettings(num_classes=5, canvas_height=320, canvas_width=320, min_size=MIN_SIZE,
                            max_size=MAX_SIZE, image_mean=MEAN, image_std=STD)


def random_boxes(rng: np.random.Generator, n: int, extent: float = 800.0, max_side: float = 200.0) -> np.ndarray:
    """``[n, 4]`` float32 boxes with x1 < x2, y1 < y2 inside roughly ``[0, extent]``."""
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(1, max_side, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def tv_nms(boxes, scores, thr) -> np.ndarray:
    return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


def tv_batched_nms(boxes, scores, idxs, thr) -> np.ndarray:
    return torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       torch.from_numpy(idxs), thr).numpy()


def iou32(a, b) -> np.float32:
    """IoU of two boxes in float32, with torchvision's nms_kernel operation order."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter = (max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
             * max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1])))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return np.float32(inter / (area_a + area_b - inter))


# ---------------------------------------------------------------------------------------
# Elementwise box ops
# ---------------------------------------------------------------------------------------

def test_box_area_clip_and_small_boxes_match_torchvision():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 500, extent=400) - np.float32(50)  # many cross the border
    boxes[:20, 2:] = boxes[:20, :2]  # zero-size
    boxes[20:40, 2] = boxes[20:40, 0] + np.float32(5e-4)  # thinner than rpn_min_size
    t = torch.from_numpy(boxes)
    np.testing.assert_array_equal(box_area(boxes), box_ops.box_area(t).numpy())
    clipped = clip_boxes(boxes, 240, 320)
    np.testing.assert_array_equal(clipped, box_ops.clip_boxes_to_image(t, (240, 320)).numpy())
    assert (clipped != boxes).any(), "no box crossed the border: the clip case is vacuous"
    for min_size in (1e-3, 1e-2, 16.0):
        mask = small_box_mask(clipped, min_size)
        np.testing.assert_array_equal(
            np.flatnonzero(mask), box_ops.remove_small_boxes(torch.from_numpy(clipped), min_size).numpy())
        assert 0 < mask.sum() < len(mask)


# ---------------------------------------------------------------------------------------
# NMS
# ---------------------------------------------------------------------------------------

class TestNMS:
    @pytest.mark.parametrize("n", [2, 50, 4390])
    @pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
    def test_nms_random(self, n, iou_threshold):
        rng = np.random.default_rng(n)
        boxes = random_boxes(rng, n)
        boxes[1] = boxes[0] + np.float32(1)  # at least one strong overlap
        scores = rng.random(n, dtype=np.float32)
        keep = nms(boxes, scores, iou_threshold)
        expected = tv_nms(boxes, scores, iou_threshold)
        assert keep.dtype == np.int64
        np.testing.assert_array_equal(keep, expected)
        assert 0 < len(keep) < n

    @pytest.mark.parametrize("n", [200, 4390])  # torchvision: coordinate trick <= 1000 boxes, per-class loop above
    def test_batched_nms_random(self, n):
        rng = np.random.default_rng(n + 1)
        boxes = random_boxes(rng, n)
        scores = rng.random(n, dtype=np.float32)
        idxs = rng.integers(0, 5, n)
        keep = batched_nms(boxes, scores, idxs, 0.5)
        expected = tv_batched_nms(boxes, scores, idxs, 0.5)
        np.testing.assert_array_equal(keep, expected)
        assert keep.dtype == np.int64
        assert 0 < len(keep) < n
        assert len(keep) > len(nms(boxes, scores, 0.5)), "categories did not keep overlapping boxes apart"

    def test_batched_nms_does_not_suppress_across_categories(self):
        boxes = np.array([[0, 0, 10, 10]] * 3 + [[1, 1, 10, 10]], dtype=np.float32)
        scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
        idxs = np.array([0, 1, 1, 0])
        keep = batched_nms(boxes, scores, idxs, 0.5)
        np.testing.assert_array_equal(keep, [0, 1])
        np.testing.assert_array_equal(keep, tv_batched_nms(boxes, scores, idxs, 0.5))

    @pytest.mark.parametrize("op", ["nms", "batched_nms"])
    @pytest.mark.parametrize("n", [0, 1])
    def test_empty_and_one_box(self, op, n):
        boxes = np.array([[10, 20, 30, 60]], dtype=np.float32)[:n]
        scores = np.array([0.5], dtype=np.float32)[:n]
        idxs = np.array([3])[:n]
        if op == "nms":
            keep, expected = nms(boxes, scores, 0.5), tv_nms(boxes, scores, 0.5)
        else:
            keep, expected = batched_nms(boxes, scores, idxs, 0.5), tv_batched_nms(boxes, scores, idxs, 0.5)
        assert keep.shape == (n,) and keep.dtype == np.int64
        np.testing.assert_array_equal(keep, expected)

    @pytest.mark.parametrize("n", [10, 300, 4390])
    def test_nms_ties_keep_input_order(self, n):
        """torchvision's CPU nms kernel sorts scores with a stable sort: among equal scores the
        lower input index is visited (and kept) first.  Checked against torchvision, then
        against the stable order itself so the property is stated, not only matched."""
        rng = np.random.default_rng(7)
        boxes = random_boxes(rng, n)
        scores = (rng.integers(0, 4, n) / 4).astype(np.float32)  # 4 distinct values: mostly ties
        keep = nms(boxes, scores, 0.5)
        np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.5))
        stable = np.argsort(-scores, kind="stable")
        np.testing.assert_array_equal(keep, stable[np.isin(stable, keep)])
        # Disjoint boxes, all scores equal: nothing is suppressed and the order is the input order.
        disjoint = np.array([[10 * i, 0, 10 * i + 5, 5] for i in range(n)], dtype=np.float32)
        equal = np.full(n, 0.5, dtype=np.float32)
        np.testing.assert_array_equal(tv_nms(disjoint, equal, 0.5), np.arange(n))
        np.testing.assert_array_equal(nms(disjoint, equal, 0.5), np.arange(n))

    def test_batched_nms_ties_few_boxes(self):
        """<= 1000 boxes: torchvision offsets boxes per category and runs one stable nms, so
        the order among tied scores is defined (input order) and must match exactly."""
        rng = np.random.default_rng(8)
        boxes = random_boxes(rng, 600)
        scores = (rng.integers(0, 4, 600) / 4).astype(np.float32)
        idxs = rng.integers(0, 3, 600)
        keep = batched_nms(boxes, scores, idxs, 0.5)
        np.testing.assert_array_equal(keep, tv_batched_nms(boxes, scores, idxs, 0.5))
        assert len(keep) > 100

    def test_batched_nms_ties_many_boxes(self):
        """> 1000 CPU boxes: torchvision's per-class path reorders the kept boxes with
        ``Tensor.sort(descending=True)``, which is not stable, so among tied scores its order is
        implementation-defined.  Same kept set, same score sequence; ours is stable."""
        rng = np.random.default_rng(9)
        boxes = random_boxes(rng, 4390)
        scores = (rng.integers(0, 4, 4390) / 4).astype(np.float32)
        idxs = rng.integers(0, 3, 4390)
        keep = batched_nms(boxes, scores, idxs, 0.5)
        expected = tv_batched_nms(boxes, scores, idxs, 0.5)
        assert len(keep) > 1000
        np.testing.assert_array_equal(np.sort(keep), np.sort(expected))
        np.testing.assert_array_equal(scores[keep], scores[expected])
        stable = np.argsort(-scores, kind="stable")
        np.testing.assert_array_equal(keep, stable[np.isin(stable, keep)])

    # Pairs whose float32 IoU is exactly the threshold: power-of-two-friendly coordinates make
    # every intermediate (widths, areas, inter, union) exact and the division exact.
    AT_THRESHOLD = [
        ([0, 0, 3, 1], [1, 0, 4, 1], 0.5),  # inter 2, union 4
        ([0, 0, 4, 4], [0, 0, 4, 2], 0.5),  # containment: 8 / 16
        ([512, 256, 1024, 768], [512, 256, 768, 768], 0.5),
        ([0, 0, 8, 8], [2, 2, 10, 10], None),  # 36 / 92 rounds: the threshold is that float32 value
        ([0, 0, 5, 1], [3, 0, 8, 1], 0.25),  # inter 2, union 8
        ([0, 0, 16, 16], [0, 0, 16, 12], 0.75),  # 192 / 256
    ]

    @pytest.mark.parametrize("a, b, thr", AT_THRESHOLD)
    def test_nms_iou_exactly_at_threshold_survives(self, a, b, thr):
        """torchvision suppresses only IoU > threshold."""
        thr = float(iou32(a, b)) if thr is None else thr
        assert float(iou32(a, b)) == thr, "test boxes are not exactly at the threshold"
        boxes = np.array([a, b], dtype=np.float32)
        scores = np.array([0.9, 0.8], dtype=np.float32)
        np.testing.assert_array_equal(tv_nms(boxes, scores, thr), [0, 1])
        np.testing.assert_array_equal(nms(boxes, scores, thr), [0, 1])
        idxs = np.zeros(2, dtype=np.int64)
        np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, thr), [0, 1])
        # One step below the threshold, the second box goes.
        below = float(np.nextafter(thr, 0.0))
        np.testing.assert_array_equal(tv_nms(boxes, scores, below), [0])
        np.testing.assert_array_equal(nms(boxes, scores, below), [0])

    @pytest.mark.parametrize("thr", [0.3, 0.1, 0.7, 0.45])
    def test_nms_threshold_is_compared_in_double(self, thr):
        """torchvision compares the float IoU with the double threshold.  Boxes whose float32
        IoU is float32(thr) are suppressed iff float32(thr) > thr (0.3 and 0.1 round up, 0.7
        and 0.45 round down)."""
        num, den = {0.3: (3, 10), 0.1: (1, 10), 0.7: (7, 10), 0.45: (9, 20)}[thr]
        # Two 1-high boxes of width w shifted by s: inter = w - s = 2 num, union = w + s = 2 den.
        w, s = den + num, den - num
        a, b = [0, 0, w, 1], [s, 0, s + w, 1]
        assert iou32(a, b) == np.float32(thr)
        boxes = np.array([a, b], dtype=np.float32)
        scores = np.array([0.9, 0.8], dtype=np.float32)
        expected = [0] if float(np.float32(thr)) > thr else [0, 1]
        np.testing.assert_array_equal(tv_nms(boxes, scores, thr), expected)
        np.testing.assert_array_equal(nms(boxes, scores, thr), expected)

    def test_nms_degenerate_boxes(self):
        """Zero-width / zero-height boxes have zero area: IoU 0 with anything (0 / 0 = NaN
        between two of them), so they are never suppressed and never suppress."""
        boxes = np.array([
            [5, 5, 5, 5],  # point
            [5, 5, 5, 5],  # the same point
            [0, 0, 10, 0],  # zero height
            [3, 0, 3, 10],  # zero width
            [0, 0, 10, 10],
            [1, 1, 10, 10],  # suppressed by the previous box
        ], dtype=np.float32)
        scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no RuntimeWarning from 0 / 0
            keep = nms(boxes, scores, 0.5)
            bkeep = batched_nms(boxes, scores, np.array([0, 0, 0, 1, 1, 1]), 0.5)
        np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.5))
        np.testing.assert_array_equal(keep, [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(bkeep, tv_batched_nms(boxes, scores, np.array([0, 0, 0, 1, 1, 1]), 0.5))


# ---------------------------------------------------------------------------------------
# BoxCoder
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [BOX_CODER_WEIGHTS, (1.0, 1.0, 1.0, 1.0)])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_decode_boxes_matches_box_coder(weights, num_classes):
    rng = np.random.default_rng(1)
    n = 1000
    boxes = random_boxes(rng, n, extent=1000, max_side=500)
    boxes[0, 2:] = boxes[0, :2]  # zero-size reference box
    deltas = rng.normal(0, 1, size=(n, 4 * num_classes)).astype(np.float32)
    deltas[1:50, 2::4] = np.float32(50)  # huge dw, dh: clamped by bbox_xform_clip
    deltas[50:100, 3::4] = np.float32(1e4)
    deltas[100:150, 2:4] = np.float32(-30)  # tiny boxes
    coder = BoxCoder(weights)  # default bbox_xform_clip = log(1000 / 16)
    expected = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes)).numpy()
    out = decode_boxes(deltas, boxes, weights, BBOX_XFORM_CLIP)
    assert out.shape == (n, 4 * num_classes) and out.dtype == np.float32
    # np.exp and torch.exp differ by an ulp at times; x1, x2 = ctr -+ w / 2 then inherit an error of
    # a few ulps of max(|x1|, |x2|) = |ctr| + w / 2, the size of the pair's intermediates.
    pairs = np.abs(expected).reshape(n, num_classes, 2, 2)
    scale = np.tile(np.maximum(pairs[:, :, 0], pairs[:, :, 1]), (1, 1, 2)).reshape(n, -1)  # x1 y1 x2 y2
    assert (np.abs(out - expected) <= 4 * np.finfo(np.float32).eps * scale).all()
    assert np.isfinite(out).all()
    # Clamped: the widest box is exp(clip) * width, not exp(50 / ww) * width.
    pred_w = out[1:50, 2] - out[1:50, 0]
    ref_w = boxes[1:50, 2] - boxes[1:50, 0]
    np.testing.assert_allclose(pred_w, np.exp(BBOX_XFORM_CLIP) * ref_w, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# LevelMapper and ROIAlign
# ---------------------------------------------------------------------------------------

def square_rois(sides) -> np.ndarray:
    sides = np.asarray(sides, dtype=np.float32)
    x1 = np.float32(3)
    return np.stack([np.full_like(sides, x1), np.full_like(sides, x1), x1 + sides, x1 + sides], 1)


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


def nhwc(x: np.ndarray) -> np.ndarray:
    """The tests build maps NCHW, like torchvision; the reference takes them channels last."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x: np.ndarray) -> np.ndarray:
    """Pooled features come back [R, S, S, C]; torchvision's are [R, C, S, S]."""
    return x.transpose(0, 3, 1, 2)


def tv_roi_align(feature: np.ndarray, rois: np.ndarray, batch_idx: np.ndarray, scale: float) -> np.ndarray:
    r = np.concatenate([batch_idx[:, None].astype(np.float32), rois], axis=1)
    return torchvision.ops.roi_align(torch.from_numpy(feature), torch.from_numpy(r), output_size=7,
                                     spatial_scale=scale, sampling_ratio=2, aligned=False).numpy()


def edge_case_rois(rng: np.random.Generator, h: float, w: float) -> np.ndarray:
    """RoIs in image pixels for an image of (h, w): random, across every border, partly and
    fully outside, zero-size, 1-pixel, and the whole image."""
    cases = [
        random_boxes(rng, 60, extent=max(h, w), max_side=max(h, w) / 2),
        [[-20, -20, 30, 30], [w - 30, h - 30, w + 20, h + 20], [-50, 10, w + 50, 40], [10, -50, 40, h + 50]],
        [[-100, -100, -60, -60], [w + 10, h + 10, w + 90, h + 90]],  # fully outside
        [[-4.5, 3, -1, 9], [w - 0.5, 5, w + 3, 12]],  # just outside, within the [-1, extent] band
        [[12, 12, 12, 12], [0, 0, 0, 0], [w, h, w, h], [5, 5, 5, 25]],  # zero-size
        [[7, 9, 8, 10], [w - 1, h - 1, w, h], [0.5, 0.5, 1.5, 1.5]],  # 1 pixel
        [[0, 0, w, h], [0, 0, w - 1, h - 1]],
    ]
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in cases])


class TestRoIAlign:
    @pytest.mark.parametrize("stride", [4, 8, 16, 32])
    def test_roi_align_level_matches_torchvision(self, stride):
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
    def test_roi_align_level_ignores_canvas_beyond_extent(self, stride, garbage):
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

    def test_roi_align_level_empty(self):
        feature = np.zeros((2, 3, 8, 8), dtype=np.float32)
        out = nchw(roi_align_level(nhwc(feature), np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                                   np.array([[8, 8], [8, 8]]), 0.25, 7, 2))
        assert out.shape == (0, 3, 7, 7) and out.dtype == np.float32

    @pytest.mark.parametrize("sampling_ratio", [0, -1])
    def test_roi_align_level_rejects_adaptive_sampling(self, sampling_ratio):
        with pytest.raises(ValueError, match="sampling_ratio must be positive"):
            roi_align_level(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 4), np.float32),
                            np.zeros(1, np.int64), np.array([[4, 4]]), 1.0, 7, sampling_ratio)

    @pytest.mark.parametrize("image_shape", ["resized", "padded"])
    @pytest.mark.parametrize("rois_per_image", [(40, 25), (30, 0), (0, 0)])
    def test_multilevel_roi_align_matches_multiscale_roi_align(self, rois_per_image, image_shape):
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
        # Interleave the two images' RoIs: batch_idx, not position, says which image a RoI is on.
        rois = np.concatenate(rois_b)
        batch_idx = np.concatenate([np.full(len(r), b) for b, r in enumerate(rois_b)])
        perm = rng.permutation(len(rois))
        out = nchw(multilevel_roi_align([nhwc(f) for f in features], rois[perm], batch_idx[perm], padded,
                                        FPN_STRIDES, 7, 2))
        assert out.shape == (len(rois), c, 7, 7) and out.dtype == np.float32
        np.testing.assert_allclose(out[np.argsort(perm)], np.concatenate(expected), rtol=0, atol=ATOL)
        if len(rois) > 50:
            assert set(map_levels(rois).tolist()) == {0, 1, 2, 3}, "not every level was exercised"


# ---------------------------------------------------------------------------------------
# Image transform
# ---------------------------------------------------------------------------------------

IMAGE_SIZES = [
    (480, 640),  # landscape, downscale
    (640, 480),  # portrait, downscale
    (300, 300),  # square
    (5, 7),  # tiny: upscale by ~46, bounded by max_size
    (100, 150),  # upscale
    (1000, 333),  # tall: bounded by max_size
    (256, 320),  # already the target size
]


def torch_image(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1], as torchvision's detection models take it."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_transform_image_matches_generalized_rcnn_transform(size, settings):
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD)).eval()
    batch, _ = transform([torch_image(image)])
    h, w = batch.image_sizes[0]
    assert settings.resized_size(*size) == (h, w) == resized_size(*size, MIN_SIZE, MAX_SIZE)
    assert tuple(batch.tensors.shape[-2:]) == (padded_extent(h), padded_extent(w))
    out = transform_image(image, settings)
    assert out.shape == (3, h, w) and out.dtype == np.float32
    np.testing.assert_allclose(out, batch.tensors[0, :, :h, :w].numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("in_size, out_size", [
    ((37, 53), (80, 111)), ((480, 640), (240, 320)), ((33, 17), (33, 17)), ((1, 1), (4, 6)),
    ((9, 12), (1, 1)), ((256, 300), (255, 301)), ((7, 5), (322, 230)),
])
def test_resize_bilinear_matches_interpolate(in_size, out_size):
    rng = np.random.default_rng(in_size[0] + out_size[1])
    x = rng.normal(size=(3, *in_size)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x)[None], size=out_size, mode="bilinear", align_corners=False)[0]
    out = resize_bilinear(x, *out_size)
    assert out.shape == (3, *out_size) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-6 * max(1.0, np.abs(x).max()))


def test_preprocess_batch_matches_batched_transform(settings):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=s + (3,), dtype=np.uint8) for s in [(480, 640), (5, 7), (1000, 333)]]
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(MEAN), list(STD)).eval()
    expected, _ = transform([torch_image(im) for im in images])
    batch, sizes, originals = preprocess_batch(images, settings)
    assert batch.shape == (3, 3, *settings.canvas) and batch.dtype == np.float32
    np.testing.assert_array_equal(sizes, np.array(expected.image_sizes, dtype=np.float32))
    np.testing.assert_array_equal(originals, [im.shape[:2] for im in images])
    for b, (h, w) in enumerate(expected.image_sizes):
        np.testing.assert_allclose(batch[b, :, :h, :w], expected.tensors[b, :, :h, :w].numpy(), rtol=0, atol=ATOL)
        pad = batch[b].copy()
        pad[:, :h, :w] = 0
        assert not pad.any(), "padding must be zero, as torchvision's batch_images pads"


def test_preprocess_batch_rejects_image_too_big_for_canvas():
    small = DetectorSettings(num_classes=5, canvas_height=256, canvas_width=256, min_size=MIN_SIZE, max_size=MAX_SIZE)
    image = np.zeros((480, 640, 3), dtype=np.uint8)  # resizes to 240 x 320
    with pytest.raises(BadImageError, match="does not fit the 256x256 canvas"):
        preprocess_batch([image], small)


# ---------------------------------------------------------------------------------------
# Detection stages
# ---------------------------------------------------------------------------------------

def rpn_outputs(rng, image_size, num_anchors_per_level):
    """Random decoded proposals ``[1, A, 4]`` and objectness logits ``[1, A]`` for one image."""
    h, w = image_size
    total = sum(num_anchors_per_level)
    boxes = random_boxes(rng, total, extent=max(h, w), max_side=120) - np.float32(20)  # some outside
    flat = rng.random(total) < 0.03
    boxes[flat, 2] = boxes[flat, 0]  # zero width
    thin = rng.random(total) < 0.03
    boxes[thin, 3] = boxes[thin, 1] + np.float32(5e-4)  # height < rpn min_size
    # Distinct probabilities: torchvision reorders > 1000 kept boxes with an unstable sort, so the
    # order of tied scores is not defined (see TestNMS.test_batched_nms_ties_many_boxes).
    logits = rng.permutation(np.linspace(-5, 5, total)).astype(np.float32)
    return torch.from_numpy(boxes)[None], torch.from_numpy(logits)[None]


def proposal_rows(props, obj, image_size, num_anchors_per_level, pre_nms_top_n, pad_to):
    """The same candidates as rows ``x1 y1 x2 y2 prob level``, as the rpn network emits them:
    top-k per level by logit, clipped, sigmoid, then padding rows of level -1."""
    h, w = image_size
    rows, start = [], 0
    for level, n in enumerate(num_anchors_per_level):
        k = min(pre_nms_top_n, n)
        _, top = obj[0, start:start + n].topk(k)  # torchvision _get_top_n_idx
        idx = (top + start).numpy()
        b = box_ops.clip_boxes_to_image(props[0, idx], image_size).numpy()
        prob = torch.sigmoid(obj[0, idx]).numpy()
        rows.append(np.concatenate([b, prob[:, None], np.full((k, 1), level, np.float32)], 1))
        # Padding rows that would win every NMS if they counted: huge, certain boxes.
        rows.append(np.tile(np.array([[0, 0, w, h, 1.0, -1]], dtype=np.float32), (pad_to - k, 1)))
        start += n
    return np.concatenate(rows)


@pytest.mark.parametrize("score_thresh, post_nms_top_n", [
    (0.0, 1000), (0.6, 1000), (0.0, 50),
    ("last_kept", 5000),  # threshold exactly at a kept probability: kept, since torchvision uses >=
])
def test_filter_proposals_matches_rpn(model, score_thresh, post_nms_top_n):
    rng = np.random.default_rng(post_nms_top_n + (score_thresh == 0.6))
    rpn = RegionProposalNetwork(
        model.rpn.anchor_generator, model.rpn.head, 0.7, 0.3, 256, 0.5,
        pre_nms_top_n=dict(training=2000, testing=1000), post_nms_top_n=dict(training=2000, testing=post_nms_top_n),
        nms_thresh=0.7, score_thresh=0.0 if score_thresh == "last_kept" else score_thresh,
    ).eval()
    image_size = (256, 320)
    padded = (padded_extent(256), padded_extent(320))
    num_anchors = [3 * level_grid(padded[0], s) * level_grid(padded[1], s) for s in RPN_STRIDES]
    props, obj = rpn_outputs(rng, image_size, num_anchors)
    if score_thresh == "last_kept":
        _, kept_scores = rpn.filter_proposals(props, obj, [image_size], num_anchors)
        score_thresh = rpn.score_thresh = float(kept_scores[0][-1])
    expected, expected_scores = rpn.filter_proposals(props, obj, [image_size], num_anchors)
    expected, expected_scores = expected[0].numpy(), expected_scores[0].numpy()
    rows = proposal_rows(props, obj, image_size, num_anchors, rpn.pre_nms_top_n(), pad_to=1000)
    live = rows[rows[:, 5] >= 0]
    assert len(np.unique(live[:, 4])) == len(live) and len(live) < len(rows)
    out = filter_proposals(rows, rpn.min_size, score_thresh, 0.7, post_nms_top_n)
    assert out.dtype == np.float32 and out.shape[1] == 4
    np.testing.assert_array_equal(out, expected)
    assert 0 < len(out) <= post_nms_top_n
    assert len(out) == post_nms_top_n or score_thresh > 0
    if post_nms_top_n == 5000:
        assert expected_scores[-1] == np.float32(score_thresh)


def test_filter_proposals_only_padding():
    rows = np.tile(np.array([[0, 0, 50, 50, 0.9, -1]], dtype=np.float32), (10, 1))
    out = filter_proposals(rows, 1e-3, 0.0, 0.7, 1000)
    assert out.shape == (0, 4)
    assert filter_proposals(np.zeros((0, 6), np.float32), 1e-3, 0.0, 0.7, 1000).shape == (0, 4)


def header_outputs(rng, num_rois, num_classes, image_size, case):
    h, w = image_size
    proposals = clip_boxes(random_boxes(rng, num_rois, extent=max(h, w), max_side=150), h, w)
    logits = rng.normal(0, 2, size=(num_rois, num_classes)).astype(np.float32)
    if case == "none_above_threshold":
        logits[:, 0] += 20  # background wins everywhere: every class score < 0.05
    if case == "at_threshold":
        # softmax([log 16, 0, 0, 0, 0]) is exactly float32(0.05) for the four classes; torchvision
        # keeps only scores > thresh, compared in float32.
        logits[::2] = np.array([math.log(16.0), 0, 0, 0, 0], dtype=np.float32)
    regression = rng.normal(0, 1, size=(num_rois, 4 * num_classes)).astype(np.float32)
    regression[:5] *= 40  # boxes that leave the image and degenerate after clipping
    return proposals, logits, regression


@pytest.mark.parametrize("case, num_rois", [
    ("random", 1000), ("random", 3), ("zero_rois", 0), ("none_above_threshold", 300), ("at_threshold", 40),
])
@pytest.mark.parametrize("decoder", ["torchvision", "reference"])
def test_postprocess_detections_matches_roi_heads(model, settings, case, num_rois, decoder):
    rng = np.random.default_rng(num_rois)
    num_classes, image_size = settings.num_classes, (240, 320)
    proposals, logits, regression = header_outputs(rng, num_rois, num_classes, image_size, case)
    heads = model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (
        settings.box_score_thresh, settings.box_nms_thresh, settings.box_detections_per_img)
    boxes_t, scores_t, labels_t = heads.postprocess_detections(
        torch.from_numpy(logits), torch.from_numpy(regression), [torch.from_numpy(proposals)], [image_size])

    scores = F.softmax(torch.from_numpy(logits), -1).numpy()
    if case == "none_above_threshold":
        assert num_rois > 0 and scores[:, 1:].max() <= settings.box_score_thresh
    if case == "at_threshold":
        assert (scores[::2, 1:] == np.float32(settings.box_score_thresh)).all()
    if decoder == "torchvision":
        decoded = heads.box_coder.decode(torch.from_numpy(regression), [torch.from_numpy(proposals)]).numpy()
    else:
        decoded = decode_boxes(regression, proposals, settings.box_coder_weights, settings.bbox_xform_clip)
    boxes, out_scores, labels = postprocess_detections(
        scores, decoded.reshape(num_rois, num_classes, 4), image_size, settings.box_score_thresh,
        settings.box_min_size, settings.box_nms_thresh, settings.box_detections_per_img)
    np.testing.assert_array_equal(labels, labels_t[0].numpy())
    np.testing.assert_allclose(boxes, boxes_t[0].numpy(), rtol=0, atol=1e-4)  # boxes in pixels, up to ~320
    np.testing.assert_allclose(out_scores, scores_t[0].numpy(), rtol=0, atol=ATOL)
    assert boxes.dtype == out_scores.dtype == np.float32 and labels.dtype == np.int64
    if case in ("zero_rois", "none_above_threshold"):
        assert len(labels) == 0
    elif num_rois == 1000:
        assert len(labels) == settings.box_detections_per_img  # the top-k cut is exercised
    else:
        assert len(labels) > 0


@pytest.mark.parametrize("resized, original", [
    ((256, 320), (480, 600)), ((228, 320), (5, 7)), ((300, 300), (300, 300)), ((320, 106), (1000, 333)),
])
def test_rescale_boxes_matches_resize_boxes(resized, original):
    """GeneralizedRCNNTransform.postprocess calls resize_boxes(boxes, resized, original)."""
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 100, extent=max(resized), max_side=100)
    expected = resize_boxes(torch.from_numpy(boxes), list(resized), list(original)).numpy()
    np.testing.assert_array_equal(rescale_boxes(boxes, resized, original), expected)
    assert rescale_boxes(np.zeros((0, 4), np.float32), resized, original).shape == (0, 4)


@pytest.mark.parametrize("n", [0, 3, 100, 130])
def test_pack_detections(n):
    rng = np.random.default_rng(n)
    boxes, scores = random_boxes(rng, n), rng.random(n, dtype=np.float32)
    labels = rng.integers(1, 91, n)
    out_boxes, out_scores, out_labels, count = pack_detections(boxes, scores, labels, 100)
    k = min(n, 100)
    assert (out_boxes.shape, out_scores.shape, out_labels.shape, count.shape) == ((100, 4), (100,), (100,), (1,))
    assert (out_boxes.dtype, out_scores.dtype, out_labels.dtype, count.dtype) == (
        np.float32, np.float32, np.int32, np.int32)
    assert count[0] == k
    np.testing.assert_array_equal(out_boxes[:k], boxes[:k])
    np.testing.assert_array_equal(out_scores[:k], scores[:k])
    np.testing.assert_array_equal(out_labels[:k], labels[:k])
    assert not out_boxes[k:].any() and not out_scores[k:].any() and not out_labels[k:].any()


# ---------------------------------------------------------------------------------------
# Image decoding
# ---------------------------------------------------------------------------------------

def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB pixels, with no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("JPEG", "L")])
def test_decode_image_roundtrip(fmt, mode):
    """Grey and RGBA inputs come out as RGB, as the model expects."""
    from PIL import Image

    yy, xx = np.mgrid[:37, :53]
    rgb = np.stack([yy * 6, xx * 4, 255 - yy * 3 - xx * 2], axis=2).astype(np.uint8)  # smooth: JPEG-friendly
    image = np.asarray(Image.fromarray(rgb).convert(mode))
    out = decode_image(encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})), 10_000, 2)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(image).convert("RGB"))
    if fmt == "PNG":
        np.testing.assert_array_equal(out, expected)
    else:
        assert np.abs(out.astype(int) - expected).mean() < 3


def bad_inputs():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    jpeg = encode(image, "JPEG")
    return [
        pytest.param(b"", {}, "empty input", id="empty"),
        pytest.param(rng.bytes(2000), {}, "not a decodable image", id="random-bytes"),
        pytest.param(jpeg[: len(jpeg) // 2], {}, "truncated", id="truncated-jpeg"),
        pytest.param(encode(image, "PNG")[:-40], {}, "truncated", id="truncated-png"),
        pytest.param("not bytes", {}, "expected encoded image bytes, got str", id="str"),
        pytest.param(png_header_only(6000, 6000), {"max_pixels": 1_000_000},
                     "6000x6000 = 36000000 pixels exceeds the limit of 1000000", id="header-over-limit"),
        # Pillow's own bomb limit is lifted: our max_pixels decides, then the missing data is found
        pytest.param(png_header_only(100_000, 100_000), {"max_pixels": 10**12}, "corrupt or truncated image",
                     id="header-huge-allowed-then-truncated"),
        pytest.param(encode(image, "PNG"), {"max_pixels": 1000}, "exceeds the limit of 1000 pixels",
                     id="real-image-over-limit"),
        pytest.param(encode(image[:1, :1], "PNG"), {}, "smaller than the minimum side of 2", id="one-pixel"),
        pytest.param(encode(image[:1], "PNG"), {}, "48x1 pixels is smaller", id="one-row"),
    ]


@pytest.mark.parametrize("data, limits, message", bad_inputs())
def test_decode_image_rejects(data, limits, message):
    kwargs = {"max_pixels": 50_000_000, "min_side": 2, **limits}
    with pytest.raises(BadImageError, match=message.replace("(", r"\(")):
        decode_image(data, **kwargs)


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), np.float32), "expected a uint8 image, got dtype float32"),
    (np.zeros((8, 8), np.uint8), "expected an HWC image with 3 channels, got shape [8, 8]"),
    (np.zeros((8, 8, 4), np.uint8), "3 channels, got shape [8, 8, 4]"),
    (np.zeros((1, 8, 3), np.uint8), "smaller than the minimum side of 2"),
    (np.zeros((100, 100, 3), np.uint8), "exceeds the limit of 5000 pixels"),
])
def test_check_image_array_rejects(image, message):
    with pytest.raises(BadImageError) as err:
        check_image_array(image, max_pixels=5000, min_side=2)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_check_image_array_accepts():
    check_image_array(np.zeros((2, 2500, 3), np.uint8), max_pixels=5000, min_side=2)


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

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
def test_level_grid_matches_fpn_feature_maps(model, padded):
    """level_grid gives the FPN map sizes P2..P6 (P6 'pool' = max-pool k1 s2, so it rounds up)."""
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, *padded))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    for f, s in zip(feats.values(), RPN_STRIDES):
        assert tuple(f.shape[-2:]) == (level_grid(padded[0], s), level_grid(padded[1], s))
