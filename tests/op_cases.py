"""Shared cases and references of the operator tests (``tests/test_ops_*.py``).

The operator tests are written once and run on every backend of
:func:`python_backend.backends.get_backend`, like torchvision's ``RoIOpTester`` runs over
devices: the ``backend`` fixture gives NumPy always and CuPy where CuPy sees a CUDA device
(skipped with the reason elsewhere); ``gpu_backend`` gives only CuPy, for the fast path's own
cases (its agreement with the NumPy reference, its memory pool).  Test modules import the
fixtures they use from here.

Index outputs must be identical to torchvision's; float outputs agree to ``ATOL`` unless a test
says otherwise.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from python_backend.backends import get_backend
from python_backend.settings import FPN_STRIDES, DetectorSettings, padded_extent

ATOL = 1e-5  # float32 tolerance for values of order 1 (features, images, scores)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Small sizes keep the suite fast; the arithmetic is the same at 800 / 1333.
MIN_SIZE, MAX_SIZE = 256, 320
CANVAS = (800, 1344)  # the default landscape canvas: realistic batches of 4390 proposals
LEVEL_TOPK = (1000, 1000, 1000, 1000, 390)  # 4390 proposals on 5 levels
TV_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COCO_SETTINGS = DetectorSettings(num_classes=91)
SMALL_SETTINGS = DetectorSettings(num_classes=5, min_size=MIN_SIZE,  # canvases 256x256, 256x320, 320x256
                                  max_size=MAX_SIZE, image_mean=MEAN, image_std=STD)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def gpu_skip_reason() -> str | None:
    """Why the CuPy backend cannot run here, or None when it can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: the GPU path cannot be tested here"
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:  # driver present without a device, or no driver at all
        devices = 0
    return None if devices else "no CUDA device visible to CuPy"


def _get(device: str):
    if device == "gpu" and gpu_skip_reason():
        pytest.skip(gpu_skip_reason())
    return get_backend(device)


@pytest.fixture(params=[pytest.param("cpu", id="numpy"), pytest.param("gpu", id="cupy", marks=pytest.mark.gpu)])
def backend(request):
    """Every backend: NumPy, and CuPy where a CUDA device is visible."""
    return _get(request.param)


@pytest.fixture(params=[pytest.param("gpu", id="cupy", marks=pytest.mark.gpu)])
def gpu_backend(request):
    """The CuPy backend alone, for what only the fast path has (and its agreement with the reference)."""
    return _get(request.param)


@functools.lru_cache(maxsize=1)
def reference():
    return get_backend("cpu")


def host(backend, *arrays):
    """``arrays`` as NumPy arrays (one or a tuple)."""
    out = tuple(backend.to_host(a) for a in arrays)
    return out[0] if len(out) == 1 else out


def valid_rois(backend, kept):
    """The RoIs of a ``ProposalRois`` on the host: rois ``[R, 4]``, roi_img ``[R]``, counts ``[B]``."""
    n = kept.total()
    return host(backend, kept.rois[:n], kept.roi_img[:n], kept.counts)


# ---------------------------------------------------------------------------------------
# Boxes and NMS cases
# ---------------------------------------------------------------------------------------

def random_boxes(rng: np.random.Generator, n: int, extent: float = 800.0, max_side: float = 200.0) -> np.ndarray:
    """``[n, 4]`` float32 boxes with x1 < x2, y1 < y2 inside roughly ``[0, extent]``."""
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(1, max_side, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def unique_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct float32 scores: torchvision's CUDA sort (and its CPU per-class path above 1000
    boxes) is unstable, so exact order comparisons need inputs without ties (``rng.random`` in
    float32 collides about once in 4390 draws)."""
    return ((rng.permutation(n) + 1) / (n + 1)).astype(np.float32)


def iou32(a, b) -> np.float32:
    """IoU of two boxes in float32, with torchvision's nms_kernel operation order."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter = (max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
             * max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1])))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return np.float32(inter / (area_a + area_b - inter))


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


def tv_nms(boxes, scores, thr, device="cpu") -> np.ndarray:
    return torchvision.ops.nms(torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device),
                               thr).cpu().numpy()


def tv_batched_nms(boxes, scores, idxs, thr) -> np.ndarray:
    return torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                       torch.from_numpy(np.asarray(idxs, np.int64)), thr).numpy()


def tv_batched_vanilla(boxes, scores, idxs, thr, device=TV_DEVICE) -> np.ndarray:
    """torchvision's per-class batched_nms path (IoUs on the boxes as given, like the RPN's)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return box_ops._batched_nms_vanilla(t(boxes), t(scores), t(idxs), thr).cpu().numpy()


# ---------------------------------------------------------------------------------------
# Proposals
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
    """``[batch, 2]`` float32 resized sizes that fit the default canvas, landscape and portrait."""
    sizes = [(800, 1066), (800, 1333), (600, 800), (800, 1200), (512, 700), (800, 1344), (333, 640), (700, 1000)]
    return np.array([sizes[i % len(sizes)] for i in range(batch)], dtype=np.float32)


# ---------------------------------------------------------------------------------------
# ROIAlign
# ---------------------------------------------------------------------------------------

def edge_case_rois(rng: np.random.Generator, h: float, w: float, n_random: int = 60) -> np.ndarray:
    """RoIs in image pixels for an image of (h, w): random (large and small), across every
    border, partly and fully outside, zero-size, 1-pixel, on level edges, the whole image."""
    cases = [
        random_boxes(rng, n_random, extent=max(h, w), max_side=max(h, w) / 2),
        random_boxes(rng, n_random // 4, extent=max(h, w), max_side=40),  # small: level P2
        [[-20, -20, 30, 30], [w - 30, h - 30, w + 20, h + 20], [-50, 10, w + 50, 40], [10, -50, 40, h + 50]],
        [[-100, -100, -60, -60], [w + 10, h + 10, w + 90, h + 90]],  # fully outside
        [[-4.5, 3, -1, 9], [w - 0.5, 5, w + 3, 12]],  # just outside, within the [-1, extent] band
        [[12, 12, 12, 12], [0, 0, 0, 0], [w, h, w, h], [5, 5, 5, 25]],  # zero-size
        [[7, 9, 8, 10], [w - 1, h - 1, w, h], [0.5, 0.5, 1.5, 1.5]],  # 1 pixel
        [[0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448]],  # sqrt(area) on level edges
        [[0, 0, w, h], [0, 0, w - 1, h - 1]],  # the whole image
    ]
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in cases])


def nhwc(x: np.ndarray) -> np.ndarray:
    """The tests build maps NCHW, like torchvision; the operators take them channels last."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nchw(x: np.ndarray) -> np.ndarray:
    """Pooled features come back [R, S, S, C]; torchvision's are [R, C, S, S]."""
    return x.transpose(0, 3, 1, 2)


def tv_roi_align(feature: np.ndarray, rois: np.ndarray, batch_idx: np.ndarray, scale: float) -> np.ndarray:
    """torchvision.ops.roi_align (aligned=False) of NCHW ``feature``."""
    r = np.concatenate([batch_idx[:, None].astype(np.float32), rois], axis=1)
    return torchvision.ops.roi_align(torch.from_numpy(feature), torch.from_numpy(r), output_size=7,
                                     spatial_scale=scale, sampling_ratio=2, aligned=False).numpy()


def canvas_features(rng, batch: int, channels: int, image_sizes: np.ndarray, garbage: float = 1e3,
                    canvas=CANVAS) -> list[np.ndarray]:
    """P2..P5 on the canvas, channels last: random inside each image's padded extent, ``garbage`` beyond it."""
    feats = []
    for s in FPN_STRIDES:
        f = np.full((batch, canvas[0] // s, canvas[1] // s, channels), garbage, np.float32)
        for b, (h, w) in enumerate(image_sizes):
            eh, ew = padded_extent(int(h)) // s, padded_extent(int(w)) // s
            f[b, :eh, :ew, :] = rng.normal(size=(eh, ew, channels))
        feats.append(f)
    return feats


def tv_multiscale(features: list[np.ndarray], rois: np.ndarray, roi_img: np.ndarray, sizes,
                  device: str = "cpu") -> np.ndarray:
    """torchvision MultiScaleRoIAlign image by image, each on its own maps cropped to its padded
    size (as GeneralizedRCNN would have allocated them); channels last like ours."""
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
        assert pool.scales == [1.0 / s for s in FPN_STRIDES]
        out[sel] = got.cpu().numpy().transpose(0, 2, 3, 1)
    return out


# ---------------------------------------------------------------------------------------
# Header outputs
# ---------------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=1)
def tv_model():
    """An untrained torchvision Faster R-CNN: its rpn, roi_heads and backbone are the references."""
    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=MIN_SIZE, max_size=MAX_SIZE)
    return m.eval()
