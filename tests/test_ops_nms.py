"""``nms`` and ``batched_nms`` of every backend against torchvision.ops (and, on the GPU, the
NumPy reference): random inputs up to 4390 boxes, empty input, one box, score ties, boxes
exactly at the IoU threshold, degenerate boxes, and bad inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from op_cases import (  # noqa: F401  (backend: a fixture)
    AT_THRESHOLD, TV_DEVICE, backend, host, iou32, random_boxes, reference, tv_batched_nms, tv_batched_vanilla,
    tv_nms, unique_scores,
)


def run_nms(backend, boxes, scores, thr) -> np.ndarray:
    keep = host(backend, backend.ops.nms(boxes, scores, thr))
    assert keep.dtype == np.int64
    return keep


def run_batched(backend, boxes, scores, idxs, thr) -> np.ndarray:
    keep = host(backend, backend.ops.batched_nms(boxes, scores, idxs, thr))
    assert keep.dtype == np.int64
    return keep


def check_against_reference(backend, keep, op: str, *args) -> None:
    """A fast path must give the NumPy reference's indices exactly (the reference is checked
    against torchvision by the same tests)."""
    if backend.name != "numpy":
        np.testing.assert_array_equal(keep, getattr(reference().ops, op)(*args))


@pytest.mark.parametrize("n", [2, 50, 100, 1000, 4390])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_random(backend, n, thr):
    rng = np.random.default_rng(n)
    boxes = random_boxes(rng, n)
    boxes[1] = boxes[0] + np.float32(1)  # at least one strong overlap
    scores = unique_scores(rng, n)
    keep = run_nms(backend, boxes, scores, thr)
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, thr))
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, thr, TV_DEVICE))  # no ties: CUDA agrees
    check_against_reference(backend, keep, "nms", boxes, scores, thr)
    assert 0 < len(keep) < n


@pytest.mark.parametrize("n", [200, 300, 4390])  # torchvision: coordinate trick <= 1000 boxes, per-class loop above
def test_batched_nms_random(backend, n):
    rng = np.random.default_rng(n + 1)
    boxes, scores, idxs = random_boxes(rng, n), unique_scores(rng, n), rng.integers(0, 5, n)
    keep = run_batched(backend, boxes, scores, idxs, 0.5)
    np.testing.assert_array_equal(keep, tv_batched_nms(boxes, scores, idxs, 0.5))
    np.testing.assert_array_equal(keep, tv_batched_vanilla(boxes, scores, idxs, 0.5))
    check_against_reference(backend, keep, "batched_nms", boxes, scores, idxs, 0.5)
    assert 0 < len(keep) < n
    assert len(keep) > len(run_nms(backend, boxes, scores, 0.5)), "categories did not keep overlapping boxes apart"


def test_batched_nms_does_not_suppress_across_categories(backend):
    boxes = np.array([[0, 0, 10, 10]] * 3 + [[1, 1, 10, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    idxs = np.array([0, 1, 1, 0])
    keep = run_batched(backend, boxes, scores, idxs, 0.5)
    np.testing.assert_array_equal(keep, [0, 1])
    np.testing.assert_array_equal(keep, tv_batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("op", ["nms", "batched_nms"])
@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_one_box(backend, op, n):
    boxes = np.array([[10, 20, 30, 60]], dtype=np.float32)[:n]
    scores = np.array([0.5], dtype=np.float32)[:n]
    idxs = np.array([3])[:n]
    if op == "nms":
        keep, expected = run_nms(backend, boxes, scores, 0.5), tv_nms(boxes, scores, 0.5)
    else:
        keep, expected = run_batched(backend, boxes, scores, idxs, 0.5), tv_batched_nms(boxes, scores, idxs, 0.5)
    assert keep.shape == (n,)
    np.testing.assert_array_equal(keep, expected)
    np.testing.assert_array_equal(keep, np.arange(n))


@pytest.mark.parametrize("n", [10, 300, 4390])
def test_nms_ties_keep_input_order(backend, n):
    """torchvision's CPU nms kernel sorts scores with a stable sort: among equal scores the
    lower input index is visited (and kept) first.  Checked against torchvision, then against
    the stable order itself so the property is stated, not only matched (torchvision's CUDA
    kernel sorts unstably, so it is not compared here)."""
    rng = np.random.default_rng(7)
    boxes = random_boxes(rng, n)
    scores = (rng.integers(0, 4, n) / 4).astype(np.float32)  # 4 distinct values: mostly ties
    keep = run_nms(backend, boxes, scores, 0.5)
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.5))
    stable = np.argsort(-scores, kind="stable")
    np.testing.assert_array_equal(keep, stable[np.isin(stable, keep)])
    # Disjoint boxes, all scores equal: nothing is suppressed and the order is the input order.
    disjoint = np.array([[10 * i, 0, 10 * i + 5, 5] for i in range(n)], dtype=np.float32)
    equal = np.full(n, 0.5, dtype=np.float32)
    np.testing.assert_array_equal(tv_nms(disjoint, equal, 0.5), np.arange(n))
    np.testing.assert_array_equal(run_nms(backend, disjoint, equal, 0.5), np.arange(n))
    # Identical boxes with identical scores: the first one wins.
    dup = np.repeat(np.array([[0, 0, 4, 4], [10, 10, 14, 14], [20, 20, 24, 24]], np.float32), 3, axis=0)
    np.testing.assert_array_equal(run_nms(backend, dup, np.full(9, 0.5, np.float32), 0.5), [0, 3, 6])
    # -0.0 and +0.0 are a tie.
    far = np.array([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21]], np.float32)
    np.testing.assert_array_equal(run_nms(backend, far, np.array([-0.0, 0.0, -0.0], np.float32), 0.5), [0, 1, 2])
    idxs = rng.integers(0, 3, n)
    check_against_reference(backend, run_batched(backend, boxes, scores, idxs, 0.5), "batched_nms",
                            boxes, scores, idxs, 0.5)


def test_batched_nms_ties_few_boxes(backend):
    """<= 1000 boxes: torchvision offsets boxes per category and runs one stable nms, so the
    order among tied scores is defined (input order) and must match exactly."""
    rng = np.random.default_rng(8)
    boxes = random_boxes(rng, 600)
    scores = (rng.integers(0, 4, 600) / 4).astype(np.float32)
    idxs = rng.integers(0, 3, 600)
    keep = run_batched(backend, boxes, scores, idxs, 0.5)
    np.testing.assert_array_equal(keep, tv_batched_nms(boxes, scores, idxs, 0.5))
    assert len(keep) > 100


def test_batched_nms_ties_many_boxes(backend):
    """> 1000 CPU boxes: torchvision's per-class path reorders the kept boxes with
    ``Tensor.sort(descending=True)``, which is not stable, so among tied scores its order is
    implementation-defined.  Same kept set, same score sequence; ours is stable."""
    rng = np.random.default_rng(9)
    boxes = random_boxes(rng, 4390)
    scores = (rng.integers(0, 4, 4390) / 4).astype(np.float32)
    idxs = rng.integers(0, 3, 4390)
    keep = run_batched(backend, boxes, scores, idxs, 0.5)
    expected = tv_batched_nms(boxes, scores, idxs, 0.5)
    assert len(keep) > 1000
    np.testing.assert_array_equal(np.sort(keep), np.sort(expected))
    np.testing.assert_array_equal(scores[keep], scores[expected])
    stable = np.argsort(-scores, kind="stable")
    np.testing.assert_array_equal(keep, stable[np.isin(stable, keep)])


@pytest.mark.parametrize("a, b, thr", AT_THRESHOLD)
def test_iou_exactly_at_threshold_survives(backend, a, b, thr):
    """torchvision suppresses only IoU > threshold."""
    thr = float(iou32(a, b)) if thr is None else thr
    assert float(iou32(a, b)) == thr, "test boxes are not exactly at the threshold"
    boxes = np.array([a, b], dtype=np.float32)
    scores = np.array([0.9, 0.8], dtype=np.float32)
    # One float32 step below: torchvision's CUDA kernel takes the threshold as a float, so a
    # double one ulp below would round back up to the threshold there.
    below = float(np.nextafter(np.float32(thr), np.float32(0)))
    for t, expected in ((thr, [0, 1]), (below, [0])):
        np.testing.assert_array_equal(run_nms(backend, boxes, scores, t), expected)
        np.testing.assert_array_equal(run_batched(backend, boxes, scores, np.zeros(2, np.int64), t), expected)
        np.testing.assert_array_equal(tv_nms(boxes, scores, t), expected)
        np.testing.assert_array_equal(tv_nms(boxes, scores, t, TV_DEVICE), expected)


@pytest.mark.parametrize("thr", [0.3, 0.1, 0.7, 0.45])
def test_threshold_is_compared_in_double(backend, thr):
    """torchvision's CPU kernel compares the float IoU with the double threshold.  Boxes whose
    float32 IoU is float32(thr) are suppressed iff float32(thr) > thr (0.3 and 0.1 round up,
    0.7 and 0.45 round down)."""
    num, den = {0.3: (3, 10), 0.1: (1, 10), 0.7: (7, 10), 0.45: (9, 20)}[thr]
    # Two 1-high boxes of width w shifted by s: inter = w - s = 2 num, union = w + s = 2 den.
    w, s = den + num, den - num
    a, b = [0, 0, w, 1], [s, 0, s + w, 1]
    assert iou32(a, b) == np.float32(thr)
    boxes = np.array([a, b], dtype=np.float32)
    scores = np.array([0.9, 0.8], dtype=np.float32)
    expected = [0] if float(np.float32(thr)) > thr else [0, 1]
    np.testing.assert_array_equal(tv_nms(boxes, scores, thr), expected)
    np.testing.assert_array_equal(run_nms(backend, boxes, scores, thr), expected)


def test_degenerate_boxes(backend):
    """Zero-width / zero-height boxes have zero area: IoU 0 with anything (0 / 0 = NaN between
    two of them), so they are never suppressed and never suppress.  An inverted box too."""
    boxes = np.array([
        [5, 5, 5, 5],  # point
        [5, 5, 5, 5],  # the same point
        [0, 0, 10, 0],  # zero height
        [3, 0, 3, 10],  # zero width
        [0, 0, 10, 10],
        [1, 1, 10, 10],  # suppressed by the previous box
        [10, 10, 0, 0],  # inverted
    ], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], dtype=np.float32)
    idxs = np.array([0, 0, 0, 1, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0 / 0
        keep = run_nms(backend, boxes, scores, 0.5)
        bkeep = run_batched(backend, boxes, scores, idxs, 0.5)
    np.testing.assert_array_equal(keep, tv_nms(boxes, scores, 0.5))
    np.testing.assert_array_equal(keep[:5], [0, 1, 2, 3, 4])
    assert 5 not in keep
    np.testing.assert_array_equal(bkeep, tv_batched_nms(boxes, scores, idxs, 0.5))


BOXES, SCORES = np.zeros((3, 4), np.float32), np.zeros(3, np.float32)


@pytest.mark.parametrize("boxes, scores, error, message", [
    (np.zeros((3, 5), np.float32), SCORES, ValueError,
     r"boxes should have 4 elements in dimension 1 .*got shape \(3, 5\)"),
    (np.zeros(4, np.float32), SCORES, ValueError, r"boxes should be a 2d array \[N, 4\], got 1d"),
    (np.zeros((1, 3, 4), np.float32), SCORES, ValueError, "boxes should be a 2d array"),
    (BOXES, np.zeros((3, 2), np.float32), ValueError, r"scores should be a 1d array \[N\], got 2d"),
    (BOXES, np.zeros(4, np.float32), ValueError, "boxes and scores should have the same number of elements "
                                                 "in dimension 0, got 3 and 4"),
    (np.zeros((3, 4), np.int32), SCORES, TypeError, "boxes should be a floating-point array, got dtype int32"),
    (BOXES, np.zeros(3, np.int64), TypeError, "scores should be a floating-point array, got dtype int64"),
    (BOXES, np.zeros(3, bool), TypeError, "scores should be a floating-point array, got dtype bool"),
])
@pytest.mark.parametrize("op", ["nms", "batched_nms"])
def test_rejects_bad_input(backend, op, boxes, scores, error, message):
    """torchvision's checks (test_ops.py test_nms_input_errors), as ValueError / TypeError."""
    args = (boxes, scores, 0.5) if op == "nms" else (boxes, scores, np.zeros(len(scores), np.int64), 0.5)
    with pytest.raises(error, match=message):
        getattr(backend.ops, op)(*args)


@pytest.mark.parametrize("idxs, error, message", [
    (np.zeros(2, np.int64), ValueError, "boxes and idxs should have the same number of elements in dimension 0, "
                                        "got 3 and 2"),
    (np.zeros((3, 1), np.int64), ValueError, r"idxs should be a 1d array \[N\], got 2d"),
    (np.zeros(3, np.float32), TypeError, "idxs should be an integer array, got dtype float32"),
])
def test_batched_nms_rejects_bad_idxs(backend, idxs, error, message):
    with pytest.raises(error, match=message):
        backend.ops.batched_nms(BOXES, SCORES, idxs, 0.5)


def test_float64_input_is_computed_in_float32(backend):
    """Any floating precision is accepted; the IoU is float32 (so an IoU exactly at the threshold
    in float32 still survives, whatever the input precision)."""
    a, b, thr = AT_THRESHOLD[0]
    boxes = np.array([a, b], dtype=np.float64)
    scores = np.array([0.9, 0.8], dtype=np.float64)
    np.testing.assert_array_equal(run_nms(backend, boxes, scores, thr), [0, 1])
    below = float(np.nextafter(np.float32(thr), np.float32(0)))
    np.testing.assert_array_equal(run_nms(backend, boxes, scores, below), [0])
