"""The CuPy fast path (``python_backend.cuda``) against the NumPy reference and torchvision.

Same cases as ``test_reference_ops.py``: random inputs at realistic sizes (B in {1, 8} x 4390
proposals on 5 levels), empty input, one box, score ties, boxes exactly at the IoU threshold,
degenerate boxes, RoIs across every border with garbage on the canvas beyond each image.
NMS keep sets and their order must be identical; ROIAlign agrees to 1e-5.

Needs CuPy and a CUDA device; skipped with the reason elsewhere.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

cp = pytest.importorskip("cupy", reason="CuPy is not installed: the GPU path cannot be tested here")
try:
    _DEVICES = cp.cuda.runtime.getDeviceCount()
except cp.cuda.runtime.CUDARuntimeError:  # driver present without a device, or no driver at all
    _DEVICES = 0
if _DEVICES == 0:
    pytest.skip("no CUDA device visible to CuPy", allow_module_level=True)

import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402
from torchvision.ops import boxes as box_ops  # noqa: E402

from python_backend import steps as ref_steps  # noqa: E402
from python_backend.cuda import nms as gpu_nms  # noqa: E402
from python_backend.cuda import steps as gpu_steps  # noqa: E402
from python_backend.cuda.detection import postprocess_detections_batched  # noqa: E402
from python_backend.cuda.proposals import filter_proposals_batched  # noqa: E402
from python_backend.cuda.roi_align import multilevel_roi_align as gpu_multilevel_roi_align  # noqa: E402
from python_backend.reference import boxes as ref_boxes  # noqa: E402
from python_backend.reference import detection as ref_detection  # noqa: E402
from python_backend.reference.roi_align import multilevel_roi_align  # noqa: E402
from python_backend.settings import FPN_STRIDES, DetectorSettings, padded_extent  # noqa: E402

pytestmark = pytest.mark.gpu

ATOL = 1e-5
LEVEL_TOPK = (1000, 1000, 1000, 1000, 390)  # 4390 proposals on 5 levels
CANVAS = (800, 1344)
TV_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = DetectorSettings(num_classes=91)


def random_boxes(rng: np.random.Generator, n: int, extent: float = 800.0, max_side: float = 200.0) -> np.ndarray:
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(1, max_side, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def unique_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct float32 scores: torchvision's CUDA sort is unstable, so exact order comparisons with
    it need inputs without ties (``rng.random`` in float32 collides about once in 4390 draws)."""
    return ((rng.permutation(n) + 1) / (n + 1)).astype(np.float32)


def iou32(a, b) -> np.float32:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter = (max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
             * max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1])))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return np.float32(inter / (area_a + area_b - inter))


def ours_nms(boxes, scores, thr) -> np.ndarray:
    return cp.asnumpy(gpu_nms.nms(cp.asarray(boxes), cp.asarray(scores), thr))


def ours_batched(boxes, scores, idxs, thr) -> np.ndarray:
    return cp.asnumpy(gpu_nms.batched_nms(cp.asarray(boxes), cp.asarray(scores), cp.asarray(idxs), thr))


def tv_nms(boxes, scores, thr, device="cpu") -> np.ndarray:
    return torchvision.ops.nms(torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device),
                               thr).cpu().numpy()


def tv_batched_vanilla(boxes, scores, idxs, thr, device) -> np.ndarray:
    """torchvision's per-class batched_nms path (IoUs on the boxes as given, like the RPN's)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return box_ops._batched_nms_vanilla(t(boxes), t(scores), t(idxs), thr).cpu().numpy()


# ---------------------------------------------------------------------------------------
# NMS
# ---------------------------------------------------------------------------------------

class TestNms:
    @pytest.mark.parametrize("n", [2, 100, 1000, 4390])
    @pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
    def test_nms_random(self, n, thr):
        rng = np.random.default_rng(n)
        boxes = random_boxes(rng, n)
        scores = unique_scores(rng, n)
        keep = ours_nms(boxes, scores, thr)
        assert keep.dtype == np.int64
        np.testing.assert_array_equal(keep, ref_boxes.nms(boxes, scores, thr))
        np.testing.assert_array_equal(keep, tv_nms(boxes, scores, thr))
        np.testing.assert_array_equal(keep, tv_nms(boxes, scores, thr, TV_DEVICE))  # no ties: CUDA agrees

    @pytest.mark.parametrize("n", [300, 4390])
    def test_batched_nms_random(self, n):
        rng = np.random.default_rng(n + 1)
        boxes, scores, idxs = random_boxes(rng, n), unique_scores(rng, n), rng.integers(0, 5, n)
        keep = ours_batched(boxes, scores, idxs, 0.5)
        np.testing.assert_array_equal(keep, ref_boxes.batched_nms(boxes, scores, idxs, 0.5))
        np.testing.assert_array_equal(keep, tv_batched_vanilla(boxes, scores, idxs, 0.5, TV_DEVICE))

    @pytest.mark.parametrize("n", [10, 300, 4390])
    def test_ties_keep_input_order(self, n):
        """Stable descending sort: among equal scores the lower input index is visited first, as
        torchvision's CPU kernel does (its CUDA kernel sorts unstably, so it is not compared)."""
        rng = np.random.default_rng(7)
        boxes = random_boxes(rng, n)
        scores = (rng.integers(0, 4, n) / 4).astype(np.float32)
        keep = ours_nms(boxes, scores, 0.5)
        np.testing.assert_array_equal(keep, ref_boxes.nms(boxes, scores, 0.5))
        np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.5))
        # identical boxes with identical scores: the first one wins
        dup = np.repeat(np.array([[0, 0, 4, 4], [10, 10, 14, 14], [20, 20, 24, 24]], np.float32), 3, axis=0)
        np.testing.assert_array_equal(ours_nms(dup, np.full(9, 0.5, np.float32), 0.5), [0, 3, 6])
        idxs = rng.integers(0, 3, n)
        np.testing.assert_array_equal(ours_batched(boxes, scores, idxs, 0.5),
                                      ref_boxes.batched_nms(boxes, scores, idxs, 0.5))
        # -0.0 and +0.0 are a tie
        signed = np.array([-0.0, 0.0, -0.0], np.float32)
        far = np.array([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21]], np.float32)
        np.testing.assert_array_equal(ours_nms(far, signed, 0.5), [0, 1, 2])

    AT_THRESHOLD = [
        ([0, 0, 3, 1], [1, 0, 4, 1], 0.5),
        ([0, 0, 4, 4], [0, 0, 4, 2], 0.5),
        ([512, 256, 1024, 768], [512, 256, 768, 768], 0.5),
        ([0, 0, 8, 8], [2, 2, 10, 10], None),  # 36 / 92 rounds: the threshold is that float32 value
        ([0, 0, 5, 1], [3, 0, 8, 1], 0.25),
        ([0, 0, 16, 16], [0, 0, 16, 12], 0.75),
    ]

    @pytest.mark.parametrize("a, b, thr", AT_THRESHOLD)
    def test_iou_exactly_at_threshold_survives(self, a, b, thr):
        thr = float(iou32(a, b)) if thr is None else thr
        assert float(iou32(a, b)) == thr, "test boxes are not exactly at the threshold"
        boxes = np.array([a, b], dtype=np.float32)
        scores = np.array([0.9, 0.8], dtype=np.float32)
        # One float32 step below: torchvision's CUDA kernel takes the threshold as a float, so a
        # double one ulp below would round back up to the threshold there.
        below = float(np.nextafter(np.float32(thr), np.float32(0)))
        for t, expected in ((thr, [0, 1]), (below, [0])):
            np.testing.assert_array_equal(ours_nms(boxes, scores, t), expected)
            np.testing.assert_array_equal(ref_boxes.nms(boxes, scores, t), expected)
            np.testing.assert_array_equal(tv_nms(boxes, scores, t), expected)
            np.testing.assert_array_equal(tv_nms(boxes, scores, t, TV_DEVICE), expected)

    @pytest.mark.parametrize("thr", [0.3, 0.1, 0.7, 0.45])
    def test_threshold_is_compared_in_double(self, thr):
        """As torchvision's CPU kernel: IoU float32(thr) is suppressed iff float32(thr) > thr."""
        num, den = {0.3: (3, 10), 0.1: (1, 10), 0.7: (7, 10), 0.45: (9, 20)}[thr]
        w, s = den + num, den - num
        boxes = np.array([[0, 0, w, 1], [s, 0, s + w, 1]], dtype=np.float32)
        scores = np.array([0.9, 0.8], dtype=np.float32)
        expected = [0] if float(np.float32(thr)) > thr else [0, 1]
        np.testing.assert_array_equal(ours_nms(boxes, scores, thr), expected)
        np.testing.assert_array_equal(tv_nms(boxes, scores, thr), expected)

    @pytest.mark.parametrize("n", [0, 1])
    def test_empty_and_one_box(self, n):
        boxes = np.array([[1, 2, 30, 40]], np.float32)[:n]
        scores = np.array([0.3], np.float32)[:n]
        keep = ours_nms(boxes, scores, 0.5)
        assert keep.dtype == np.int64 and keep.shape == (n,)
        np.testing.assert_array_equal(ours_batched(boxes, scores, np.zeros(n, np.int64), 0.5), np.arange(n))

    def test_degenerate_boxes(self):
        boxes = np.array([
            [5, 5, 5, 5], [5, 5, 5, 5],  # the same point twice: 0 / 0 never suppresses
            [0, 0, 10, 0], [3, 0, 3, 10],  # zero height, zero width
            [0, 0, 10, 10], [1, 1, 10, 10],  # the second is suppressed
            [10, 10, 0, 0],  # inverted
        ], dtype=np.float32)
        scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], dtype=np.float32)
        keep = ours_nms(boxes, scores, 0.5)
        np.testing.assert_array_equal(keep, ref_boxes.nms(boxes, scores, 0.5))
        np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.5))
        idxs = np.array([0, 0, 0, 1, 1, 1, 1])
        np.testing.assert_array_equal(ours_batched(boxes, scores, idxs, 0.5),
                                      ref_boxes.batched_nms(boxes, scores, idxs, 0.5))

    def test_rejects_bad_shapes(self):
        with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
            gpu_nms.nms(cp.zeros((3, 5), cp.float32), cp.zeros(3, cp.float32), 0.5)
        with pytest.raises(ValueError, match="proposals must be"):
            filter_proposals_batched(cp.zeros((2, 10, 5), cp.float32), 1e-3, 0.0, 0.7, 1000)
        with pytest.raises(ValueError, match="expected at most 8192"):
            filter_proposals_batched(cp.zeros((1, 8193, 6), cp.float32), 1e-3, 0.0, 0.7, 1000)


# ---------------------------------------------------------------------------------------
# Proposals: filter_proposals for a batch
# ---------------------------------------------------------------------------------------

def realistic_proposals(rng: np.random.Generator, image_size, ties: bool = False) -> np.ndarray:
    """``[4390, 6]`` rows as the rpn emits them: per level, boxes clustered on objects (so NMS
    has work), clipped to the image, by descending score; some padding and tiny boxes."""
    h, w = image_size
    centers = rng.uniform([0, 0], [w, h], size=(25, 2))
    all_scores = unique_scores(rng, sum(LEVEL_TOPK)).astype(np.float64)
    rows, start = [], 0
    for level, k in enumerate(LEVEL_TOPK):
        side = 16.0 * 2 ** level
        c = centers[rng.integers(0, len(centers), k)] + rng.normal(0, side / 2, size=(k, 2))
        wh = side * rng.uniform(0.5, 2.0, size=(k, 2))
        boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
        scores = all_scores[start:start + k]
        start += k
        if ties:
            scores = np.round(scores * 8) / 8
        order = np.argsort(-scores, kind="stable")
        lvl = np.full((k, 1), level, np.float64)
        block = np.concatenate([boxes[order], scores[order, None], lvl], axis=1)
        block[k - 5:, 5] = -1  # padding rows
        block[:3, 2] = block[:3, 0]  # zero-width boxes
        rows.append(block)
    return np.concatenate(rows).astype(np.float32)


def image_sizes_for(batch: int) -> np.ndarray:
    sizes = [(800, 1066), (800, 1333), (600, 800), (800, 1200), (512, 700), (800, 1344), (333, 640), (700, 1000)]
    return np.array([sizes[i % len(sizes)] for i in range(batch)], dtype=np.float32)


def canvas_features(rng, batch: int, channels: int, image_sizes: np.ndarray, garbage: float = 1e3) -> list[np.ndarray]:
    """P2..P5 on the canvas, channels last: random inside each image's padded extent, ``garbage`` beyond it."""
    feats = []
    for s in FPN_STRIDES:
        f = np.full((batch, CANVAS[0] // s, CANVAS[1] // s, channels), garbage, np.float32)
        for b, (h, w) in enumerate(image_sizes):
            eh, ew = padded_extent(int(h)) // s, padded_extent(int(w)) // s
            f[b, :eh, :ew, :] = rng.normal(size=(eh, ew, channels))
        feats.append(f)
    return feats


class TestProposals:
    @pytest.mark.parametrize("batch", [1, 8])
    @pytest.mark.parametrize("ties", [False, True])
    def test_filter_proposals_matches_reference(self, batch, ties):
        rng = np.random.default_rng(batch + 10 * ties)
        sizes = image_sizes_for(batch)
        props = np.stack([realistic_proposals(rng, s, ties) for s in sizes])
        for settings in (SETTINGS, dataclasses.replace(SETTINGS, rpn_score_thresh=0.3, rpn_post_nms_top_n=300)):
            out = filter_proposals_batched(cp.asarray(props), settings.rpn_min_size, settings.rpn_score_thresh,
                                           settings.rpn_nms_thresh, settings.rpn_post_nms_top_n)
            counts = cp.asnumpy(out.counts)
            rois, roi_img = cp.asnumpy(out.rois), cp.asnumpy(out.roi_img)
            assert counts[-1] == counts[:-1].sum()
            row = 0
            for b in range(batch):
                expected = ref_detection.filter_proposals(props[b], settings.rpn_min_size, settings.rpn_score_thresh,
                                                          settings.rpn_nms_thresh, settings.rpn_post_nms_top_n)
                assert counts[b] == len(expected)
                np.testing.assert_array_equal(rois[row:row + counts[b]], expected)
                assert (roi_img[row:row + counts[b]] == b).all()
                row += counts[b]
            assert 0 < counts[:-1].min() and counts[:-1].max() <= settings.rpn_post_nms_top_n

    def test_filter_proposals_matches_torchvision(self):
        """torchvision's per-class batched_nms (on CUDA when present) over the live rows, then top-n;
        random scores have no ties, so the order must match too."""
        rng = np.random.default_rng(3)
        sizes = image_sizes_for(4)
        props = np.stack([realistic_proposals(rng, s) for s in sizes])
        out = filter_proposals_batched(cp.asarray(props), SETTINGS.rpn_min_size, 0.0, SETTINGS.rpn_nms_thresh, 1000)
        counts, rois = cp.asnumpy(out.counts), cp.asnumpy(out.rois)
        row = 0
        for b in range(4):
            p = props[b]
            p = p[p[:, 5] >= 0]
            p = p[ref_boxes.small_box_mask(p[:, :4], SETTINGS.rpn_min_size)]
            keep = tv_batched_vanilla(p[:, :4], p[:, 4], p[:, 5].astype(np.int64), SETTINGS.rpn_nms_thresh,
                                      TV_DEVICE)[:1000]
            np.testing.assert_array_equal(rois[row:row + counts[b]], p[keep, :4])
            row += counts[b]

    def test_only_padding_rows(self):
        props = np.zeros((2, 50, 6), np.float32)
        props[..., 5] = -1
        out = filter_proposals_batched(cp.asarray(props), 1e-3, 0.0, 0.7, 1000)
        np.testing.assert_array_equal(cp.asnumpy(out.counts), [0, 0, 0])


# ---------------------------------------------------------------------------------------
# ROIAlign
# ---------------------------------------------------------------------------------------

def edge_case_rois(rng: np.random.Generator, h: float, w: float, n_random: int) -> np.ndarray:
    cases = [
        random_boxes(rng, n_random, extent=max(h, w), max_side=max(h, w) / 2),
        random_boxes(rng, n_random // 4, extent=max(h, w), max_side=40),  # small: level P2
        [[-20, -20, 30, 30], [w - 30, h - 30, w + 20, h + 20], [-50, 10, w + 50, 40], [10, -50, 40, h + 50]],
        [[-100, -100, -60, -60], [w + 10, h + 10, w + 90, h + 90]],
        [[-4.5, 3, -1, 9], [w - 0.5, 5, w + 3, 12]],
        [[12, 12, 12, 12], [0, 0, 0, 0], [w, h, w, h], [5, 5, 5, 25]],
        [[7, 9, 8, 10], [w - 1, h - 1, w, h], [0.5, 0.5, 1.5, 1.5]],
        [[0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448]],  # level edges
        # the whole image
        [[0, 0, w, h], [0, 0, w - 1, h - 1]],
    ]
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in cases])


def tv_multiscale(features: list[np.ndarray], rois: np.ndarray, roi_img: np.ndarray, sizes: np.ndarray,
                  device: str) -> np.ndarray:
    """torchvision MultiScaleRoIAlign image by image, on each image's own (cropped) maps, made
    NCHW for torchvision; returned channels last like ours."""
    pool = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    out = np.zeros((rois.shape[0], 7, 7, features[0].shape[3]), np.float32)
    for b, (h, w) in enumerate(sizes):
        sel = np.flatnonzero(roi_img == b)
        if sel.size == 0:
            continue
        ph, pw = padded_extent(int(h)), padded_extent(int(w))
        maps = {f"p{i + 2}": torch.from_numpy(np.ascontiguousarray(
                    f[b:b + 1, :ph // s, :pw // s, :].transpose(0, 3, 1, 2))).to(device)
                for i, (f, s) in enumerate(zip(features, FPN_STRIDES))}
        got = pool(maps, [torch.from_numpy(rois[sel]).to(device)], [(int(h), int(w))])
        out[sel] = got.cpu().numpy().transpose(0, 2, 3, 1)
    return out


class TestRoIAlign:
    @pytest.mark.parametrize("batch, channels", [(1, 16), (3, 32), (2, 100)])
    def test_matches_reference_and_torchvision(self, batch, channels):
        rng = np.random.default_rng(batch)
        sizes = image_sizes_for(batch)
        feats = canvas_features(rng, batch, channels, sizes)
        rois = [edge_case_rois(rng, h, w, 200) for h, w in sizes]
        roi_img = np.concatenate([np.full(len(r), b, np.int32) for b, r in enumerate(rois)])
        rois = np.concatenate(rois)
        out = cp.asnumpy(gpu_multilevel_roi_align(
            [cp.asarray(f) for f in feats], cp.asarray(rois), cp.asarray(roi_img),
            cp.asarray([len(rois)], dtype=cp.int32), cp.asarray(sizes), FPN_STRIDES, 7, 2))
        padded = np.array([[padded_extent(int(h)), padded_extent(int(w))] for h, w in sizes])
        ref = multilevel_roi_align(feats, rois, roi_img, padded, FPN_STRIDES, 7, 2)
        assert np.abs(out - ref).max() <= ATOL
        tv = tv_multiscale(feats, rois, roi_img, sizes, "cpu")
        assert np.abs(out - tv).max() <= ATOL
        assert np.abs(out).max() < 100, "garbage beyond an image's extent was read"

    def test_rows_past_num_rois_are_skipped(self):
        rng = np.random.default_rng(5)
        sizes = image_sizes_for(1)
        feats = [cp.asarray(f) for f in canvas_features(rng, 1, 8, sizes)]
        rois = cp.asarray(edge_case_rois(rng, *sizes[0], 20))
        out = gpu_multilevel_roi_align(feats, rois, cp.zeros(len(rois), cp.int32), cp.asarray([0], cp.int32),
                                       cp.asarray(sizes), FPN_STRIDES, 7, 2)
        assert out.shape == (len(rois), 7, 7, 8)

    @pytest.mark.parametrize("sampling_ratio", [0, -1])
    def test_rejects_adaptive_sampling(self, sampling_ratio):
        feats = [cp.zeros((1, 800 // s, 1344 // s, 4), cp.float32) for s in FPN_STRIDES]
        with pytest.raises(ValueError, match="sampling_ratio must be positive"):
            gpu_multilevel_roi_align(feats, cp.zeros((1, 4), cp.float32), cp.zeros(1, cp.int32),
                                     cp.asarray([1], cp.int32), cp.asarray([[800, 1066]], cp.float32),
                                     FPN_STRIDES, 7, sampling_ratio)


# ---------------------------------------------------------------------------------------
# Whole steps
# ---------------------------------------------------------------------------------------

class TestRoiStep:
    @pytest.mark.parametrize("batch", [1, 8])
    def test_roi_step_matches_reference(self, batch):
        rng = np.random.default_rng(100 + batch)
        sizes = image_sizes_for(batch)
        props = np.stack([realistic_proposals(rng, s) for s in sizes])
        feats = canvas_features(rng, batch, 8, sizes)
        got = gpu_steps.roi_step(cp.asarray(props), [cp.asarray(f) for f in feats], cp.asarray(sizes), SETTINGS)
        ref = ref_steps.roi_step(props, feats, sizes, SETTINGS)
        np.testing.assert_array_equal(cp.asnumpy(got.counts), ref.counts)
        np.testing.assert_array_equal(cp.asnumpy(got.rois), ref.rois)
        assert got.features.shape == ref.features.shape
        assert np.abs(cp.asnumpy(got.features) - ref.features).max() <= ATOL

    def test_warm_up_holds_the_pool_any_batch_needs(self):
        """After warm_up_roi_step(max_batch), roi steps on batches of 1..max_batch (inputs joined
        from several requests, as roi.py does) take no new memory from CuPy's pool.  Control: the
        same steps on a fresh pool without the warm-up do take more."""
        max_batch = 4
        rng = np.random.default_rng(5)
        batches = []
        for n in (1, 3, 2, 4, 1, 4, 2):
            sizes = image_sizes_for(n)
            props = np.stack([realistic_proposals(rng, s) for s in sizes])
            # as many rows as the rpn emits for the settings' canvas, the rest dropped (level -1)
            pad = np.zeros((n, SETTINGS.num_proposals - props.shape[1], 6), np.float32)
            pad[..., 5] = -1
            props = np.concatenate([props, pad], axis=1)
            # features as requests of one image each, outside the pool (Triton's memory in serving)
            feats = canvas_features(rng, n, SETTINGS.fpn_channels, sizes)
            batches.append(([cp.asarray(p[None]) for p in props], [[cp.asarray(f[i:i + 1]) for i in range(n)]
                                                                   for f in feats], cp.asarray(sizes)))

        def serve(pool):
            with cp.cuda.using_allocator(pool.malloc):
                for props, feats, sizes in batches:
                    out = gpu_steps.roi_step(cp.concatenate(props), [cp.concatenate(f) for f in feats], sizes, SETTINGS)
                    assert int(out.counts.sum()) > 0
                    del out
            cp.cuda.Device().synchronize()

        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc):
            gpu_steps.warm_up_roi_step(SETTINGS, max_batch)
        reserved = pool.total_bytes()
        serve(pool)
        assert pool.total_bytes() == reserved
        cold = cp.cuda.MemoryPool()
        serve(cold)
        assert cold.total_bytes() > 0
        with pytest.raises(ValueError, match="max_batch must be positive"):
            gpu_steps.warm_up_roi_step(SETTINGS, 0)

    def test_roi_step_256_channels_matches_torchvision(self):
        rng = np.random.default_rng(11)
        sizes = image_sizes_for(1)
        props = realistic_proposals(rng, sizes[0])[None]
        feats = canvas_features(rng, 1, 256, sizes)
        got = gpu_steps.roi_step(cp.asarray(props), [cp.asarray(f) for f in feats], cp.asarray(sizes), SETTINGS)
        rois = cp.asnumpy(got.rois)
        assert rois.shape[0] == 1000
        tv = tv_multiscale(feats, rois, np.zeros(len(rois), np.int32), sizes, "cpu")
        assert np.abs(cp.asnumpy(got.features) - tv).max() <= ATOL


def header_outputs(rng, num_rois: int, num_classes: int, image_size, ties: bool = False):
    """class_scores [R, C] (softmax) and class_boxes [R, C, 4] clustered per class so that NMS works."""
    h, w = image_size
    base = random_boxes(rng, max(num_rois, 1), extent=max(h, w), max_side=200)[:num_rois]
    boxes = base[:, None, :] + rng.normal(0, 6, size=(num_rois, num_classes, 4)).astype(np.float32)
    boxes[:5] *= 3  # some leave the image
    logits = rng.normal(0, 2.5, size=(num_rois, num_classes)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:
        scores = np.round(scores * 32) / 32
    return scores.astype(np.float32), boxes.astype(np.float32)


class TestPostprocess:
    @pytest.mark.parametrize("ties", [False, True])
    def test_batch_matches_reference(self, ties):
        rng = np.random.default_rng(21 + ties)
        counts = [1000, 0, 357, 1]
        sizes = image_sizes_for(len(counts))
        originals = np.array([[480, 640], [300, 300], [1200, 1600], [640, 480]], np.float32)
        parts = [header_outputs(rng, n, 91, s, ties) for n, s in zip(counts, sizes)]
        scores = np.concatenate([p[0] for p in parts] + [np.zeros((1, 91), np.float32)])  # + a filler row
        boxes = np.concatenate([p[1] for p in parts] + [np.zeros((1, 91, 4), np.float32)])
        got = [cp.asnumpy(a) for a in gpu_steps.postprocess_batch(
            cp.asarray(scores), cp.asarray(boxes), counts, cp.asarray(sizes), cp.asarray(originals), SETTINGS)]
        starts = np.concatenate([[0], np.cumsum(counts)])
        for b in range(len(counts)):
            expected = ref_steps.postprocess_step(scores[starts[b]:starts[b + 1]], boxes[starts[b]:starts[b + 1]],
                                                  sizes[b], originals[b], SETTINGS)
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g[b], e)
        assert got[3][0, 0] == SETTINGS.box_detections_per_img  # the full image fills every slot

    @pytest.mark.parametrize("num_rois", [0, 1, 40])
    def test_single_image_step(self, num_rois):
        rng = np.random.default_rng(num_rois)
        scores, boxes = header_outputs(rng, num_rois, 91, (800, 1066))
        settings = dataclasses.replace(SETTINGS, box_score_thresh=0.01)
        got = gpu_steps.postprocess_step(cp.asarray(scores), cp.asarray(boxes), (800, 1066), (600, 800), settings)
        expected = ref_steps.postprocess_step(scores, boxes, (800, 1066), (600, 800), settings)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(cp.asnumpy(g), e)

    def test_score_exactly_at_threshold_is_dropped(self):
        """Only scores > thresh are kept, compared in float32."""
        scores = np.full((6, 5), 0.05, np.float32)
        boxes = np.tile(np.array([10, 10, 50, 50], np.float32), (6, 5, 1))
        out = postprocess_detections_batched(cp.asarray(scores), cp.asarray(boxes), [6], cp.asarray([[100, 100]]),
                                             cp.asarray([[100, 100]]), 0.05, 1e-2, 0.5, 100)
        assert int(out[3][0, 0]) == 0
