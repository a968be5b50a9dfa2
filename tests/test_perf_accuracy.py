"""benchmarks/perf.py's fp16 accuracy criterion (issue: >= 97% of detections matched)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import perf  # noqa: E402


def _rows(*pairs):
    return [{"model": "ensemble_fp16", "image": f"i{k}", "reference": r, "ours": m, "matched": m, "extra": 0,
             "criterion": "IoU>=0.9 same label matched>=97%", "pass": m >= 0.97 * r} for k, (m, r) in enumerate(pairs)]


def test_fp16_criterion_counts_every_detection():
    # one miss in a 10-detection image fails that image, not the 98.9% over all of them
    rows = _rows(*[(4, 4)] * 19, (9, 10), (2, 2), (4, 4), (1, 1), (2, 2))
    assert not all(r["pass"] for r in rows)
    assert perf.fp16_overall(rows) == (94, 95, True)


def test_fp16_criterion_fails_below_97_percent_and_on_nothing():
    assert perf.fp16_overall(_rows((90, 100), (7, 7))) == (97, 107, False)  # 90.7%
    assert perf.fp16_overall(_rows((0, 0))) == (0, 0, False)
    assert perf.fp16_overall([]) == (0, 0, False)


def test_summary_states_the_overall_fp16_figure():
    rows = _rows((9, 10), (4, 4))
    text = perf.summary_markdown("env", [], [], rows)
    assert "ensemble_fp16: 13 of 14 detections matched over all images (92.9%; criterion >= 97%: **not met**)" in text
