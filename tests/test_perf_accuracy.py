"""The accuracy criteria (evaluation/parity.py) on hand-built detections whose outcome is known.

Boxes are 100x100 squares on a grid, 100 px apart, so no two overlap.  Shifting a box by ``dx``
pixels sideways gives IoU (100 - dx) / (100 + dx) with itself: 1 px -> 0.980 (below the parity
criterion's 0.99, above the fp16 criterion's 0.9), 6 px -> 0.887 (below both).
"""
from __future__ import annotations

import numpy as np
import pytest

from evaluation.accuracy import accuracy_rows
from evaluation.bench import Record
from evaluation.parity import (FP16, PARITY, Detections, assert_parity, fp16_overall, from_packed, judge, match,
                                worst_image)
from evaluation.report import summary_markdown


def grid(n: int) -> Detections:
    """``n`` disjoint 100x100 boxes, scores falling from 0.99 by 0.004, labels cycling 1, 2, 3."""
    k = np.arange(n)
    x, y = (k % 10) * 200.0, (k // 10) * 200.0
    boxes = np.stack([x, y, x + 100, y + 100], axis=1).astype(np.float32)
    return Detections(boxes, (0.99 - 0.004 * k).astype(np.float32), (k % 3 + 1).astype(np.int64))


def changed(d: Detections, rows, dx: float = 0.0, dscore: float = 0.0, label: int | None = None) -> Detections:
    """A copy of ``d`` with ``rows`` shifted right by ``dx``, their scores moved by ``dscore`` and,
    if given, their label replaced."""
    out = Detections(d.boxes.copy(), d.scores.copy(), d.labels.copy())
    out.boxes[rows, 0::2] += dx
    out.scores[rows] += dscore
    if label is not None:
        out.labels[rows] = label
    return out


def test_equal_detections_pass_both_criteria():
    ref = grid(100)
    assert judge(ref, grid(100), PARITY) == (100, 0, True)
    assert judge(ref, grid(100), FP16) == (100, 0, True)


def test_parity_allows_exactly_one_miss_in_a_hundred():
    ref = grid(100)
    # one box 1 px off: IoU 0.980 < 0.99, so it is one miss and one extra: 99% matched, 1% extra
    assert judge(ref, changed(ref, [7], dx=1), PARITY) == (99, 1, True)
    assert judge(ref, changed(ref, [7, 50], dx=1), PARITY) == (98, 2, False)


def test_parity_compares_scores_and_labels():
    ref = grid(100)
    assert match(ref, changed(ref, [3], dscore=2e-3)) == (99, 1)  # |dscore| 2e-3 > 1e-3
    assert match(ref, changed(ref, [3], dscore=5e-4)) == (100, 0)
    assert match(ref, changed(ref, [3], label=9)) == (99, 1)


def test_extra_detections_are_limited_by_parity_only():
    ref = grid(100)
    ours = grid(102)  # the same 100 and two more
    assert judge(ref, ours, PARITY) == (100, 2, False)
    assert judge(ref, ours, FP16) == (100, 2, True)


def test_fp16_matching_ignores_scores_and_small_shifts():
    ref = grid(100)
    ours = changed(changed(ref, [1, 2], dx=1), [4], dscore=-0.3)
    assert judge(ref, ours, FP16) == (100, 0, True)  # IoU 0.980 >= 0.9, scores not compared
    assert judge(ref, changed(ref, [1, 2, 3, 4], dx=6), FP16) == (96, 4, False)  # IoU 0.887 < 0.9: 96%


def test_matching_is_one_to_one_and_prefers_the_best_overlap():
    ref = grid(2)
    twice = Detections(ref.boxes[[0, 0]], ref.scores[[0, 0]], ref.labels[[0, 0]])
    assert match(twice, Detections(ref.boxes[:1], ref.scores[:1], ref.labels[:1])) == (1, 0)
    # two candidates for reference box 0: IoU 0.980 and 1.0; the exact one is taken, the other left over
    near = changed(Detections(ref.boxes[:1], ref.scores[:1], ref.labels[:1]), [0], dx=1)
    ours = Detections(np.concatenate([near.boxes, ref.boxes[:1]]), np.repeat(ref.scores[:1], 2),
                      np.repeat(ref.labels[:1], 2))
    assert match(Detections(ref.boxes[:1], ref.scores[:1], ref.labels[:1]), ours, iou_min=0.9,
                 score_tol=np.inf) == (1, 1)


def test_nothing_to_compare_does_not_pass():
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert judge(empty, empty, PARITY) == (0, 0, False)
    assert judge(empty, grid(3), FP16) == (0, 3, False)
    assert judge(grid(3), empty, FP16) == (0, 0, False)


def test_assert_parity():
    ref = grid(20)
    assert_parity(ref, grid(20), "same")
    with pytest.raises(AssertionError, match="matched 19/20"):
        assert_parity(ref, changed(ref, [0], dx=1), "one off")
    with pytest.raises(AssertionError, match="only 5 detections; weak test"):
        assert_parity(grid(5), grid(5), "few")


def test_from_packed_keeps_the_first_num_detections():
    boxes = np.zeros((1, 100, 4), np.float32)
    boxes[0, :3] = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    scores = np.zeros((1, 100), np.float32)
    scores[0, :3] = [0.9, 0.8, 0.7]
    labels = np.zeros((1, 100), np.int32)
    labels[0, :3] = [3, 1, 2]
    d = from_packed(boxes, scores, labels, np.array([[2]], np.int32))
    np.testing.assert_array_equal(d.boxes, [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(d.scores, np.float32([0.9, 0.8]))
    assert d.labels.dtype == np.int64 and d.labels.tolist() == [3, 1]


def _three_images(missed_in_first: int, name: str = "ensemble_fp16"):
    """Three images of 33 detections (99 in all); the first has ``missed_in_first`` boxes 6 px off."""
    reference = {f"im{i}": grid(33) for i in range(3)}
    ours = {k: v for k, v in reference.items()}
    ours["im0"] = changed(reference["im0"], list(range(missed_in_first)), dx=6)
    return accuracy_rows(name, reference, ours, FP16)


def test_fp16_criterion_counts_every_detection_of_every_image():
    rows = _three_images(2)
    # the first image alone is 31/33 = 93.9% and fails; over all images 97/99 = 98.0% passes
    assert [r["pass"] for r in rows] == [False, True, True]
    assert [r["matched"] for r in rows] == [31, 33, 33]
    assert fp16_overall(rows) == (97, 99, True)
    assert fp16_overall(_three_images(3)) == (96, 99, False)  # 96.97% < 97%


def test_fp16_criterion_has_a_floor_for_each_image():
    # 20 images of 10 detections: 196/200 = 98% overall, but one image found only 8 of its 10 (80%)
    reference = {f"im{i:02d}": grid(10) for i in range(20)}
    ours = dict(reference)
    ours["im07"] = changed(reference["im07"], [0, 1], dx=6)
    ours["im12"] = changed(reference["im12"], [3], dx=6)
    ours["im15"] = changed(reference["im15"], [5], dx=6)
    rows = accuracy_rows("ensemble_fp16", reference, ours, FP16)
    assert fp16_overall(rows) == (196, 200, False)
    assert worst_image(rows) == ("im07", 0.8)
    # the same 4 misses spread over four images (9 of 10 each, 90%: at the floor) pass
    ours = {k: (changed(v, [0], dx=6) if k in ("im01", "im02", "im03", "im04") else v) for k, v in reference.items()}
    rows = accuracy_rows("ensemble_fp16", reference, ours, FP16)
    assert fp16_overall(rows) == (196, 200, True)
    assert worst_image(rows) == ("im01", 0.9)


def test_fp16_criterion_fails_on_nothing():
    assert fp16_overall([]) == (0, 0, False)
    assert worst_image([]) is None
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert fp16_overall(accuracy_rows("ensemble_fp16", {"a": empty}, {"a": grid(2)}, FP16)) == (0, 0, False)


def test_summary_states_the_overall_fp16_figure():
    rec = Record(acc_rows=_three_images(2) + _three_images(3, "ensemble_fp16_encoded"))
    text = summary_markdown("env", "goals", rec, {"raw": "decoded"})
    assert ("ensemble_fp16: 97 of 99 detections matched over all images (97.98%, worst image im0 94%; "
            "criterion >= 97% and no image < 90%: met)") in text
    assert ("ensemble_fp16_encoded: 96 of 99 detections matched over all images (96.97%, worst image im0 91%; "
            "criterion >= 97% and no image < 90%: **not met**)") in text
    assert "| ensemble_fp16_encoded | im0 | 33 | 33 | 30 | 3 | IoU>=0.9 same label matched>=97% | **no** |" in text


def test_summary_says_when_a_stage_failed():
    rec = Record(failures=["server on repo_fp16 did not start: CUDA out of memory"], notes=["perf rows: --no-perf"])
    text = summary_markdown("env", "goals", rec, {"raw": "decoded"})
    assert "**1 stage(s) failed** (Left out and failed, below)" in text
    assert "- **failed**: server on repo_fp16 did not start: CUDA out of memory" in text
    assert "- left out: perf rows: --no-perf" in text
    assert "failed" not in summary_markdown("env", "goals", Record(), {"raw": "decoded"}).split("## Left out")[0]
