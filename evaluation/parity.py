"""The project's accuracy criteria: our detections against torchvision's, image by image.

- ``PARITY`` (fp32, per image): at least 99% of torchvision's detections matched one to one by a
  detection of the same label with IoU >= 0.99 and |score difference| <= 1e-3, and no more than
  1% extra detections;
- ``FP16`` (counted over all detections of all images, :func:`fp16_overall`): at least 97% of
  torchvision fp32's detections matched by a detection of the same label with IoU >= 0.9, and no
  image below :data:`FP16_IMAGE_MIN` (90%) of its own; scores are not compared and extra detections
  are not limited.

Detections are ``boxes [D, 4]`` float32 (x1, y1, x2, y2) in original-image pixels, ``scores [D]``
and ``labels [D]`` (torchvision label ids), in torchvision's descending-score order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass
class Detections:
    boxes: np.ndarray  # [D, 4]
    scores: np.ndarray  # [D]
    labels: np.ndarray  # [D]


@dataclass(frozen=True)
class Criterion:
    """One way of calling two detection sets equal.  Fractions are of the reference's detections."""

    name: str  # as the result tables print it
    iou_min: float
    score_tol: float  # inf: scores not compared
    min_matched: float
    max_extra: float  # inf: extra detections not limited


PARITY = Criterion("IoU>=0.99 |dscore|<=1e-3 matched>=99% extra<=1%", 0.99, 1e-3, 0.99, 0.01)
FP16 = Criterion("IoU>=0.9 same label matched>=97%", 0.9, math.inf, 0.97, math.inf)
# the FP16 criterion's floor for each image: over all images 97% may hide one image that lost most of its
# detections (an image with few detections misses a tenth with one box, so the floor is lower)
FP16_IMAGE_MIN = 0.90


def torchvision_detect(model, image: np.ndarray) -> Detections:
    """``model.eval()([image])`` on one decoded HWC uint8 image, as a user would call it, on the
    model's device."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.array(image, copy=True)).to(device).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        out = model([x])[0]
    return Detections(*(out[k].cpu().numpy() for k in ("boxes", "scores", "labels")))


def from_packed(boxes, scores, labels, num) -> Detections:
    """The served layout (``boxes [100, 4]``, ``scores [100]``, ``labels [100]``, ``num_detections [1]``,
    unused slots zero; a leading batch axis of one is allowed) -> the first ``num`` detections."""
    n = int(np.asarray(num).reshape(-1)[0])
    return Detections(np.asarray(boxes).reshape(-1, 4)[:n], np.asarray(scores).reshape(-1)[:n],
                      np.asarray(labels).reshape(-1)[:n].astype(np.int64))


def match(ref: Detections, ours: Detections, iou_min: float = PARITY.iou_min,
          score_tol: float = PARITY.score_tol) -> tuple[int, int]:
    """Greedy one-to-one matching in torchvision's (descending score) order: each reference detection
    takes, among our unused detections of the same label within ``score_tol`` and at IoU >= ``iou_min``,
    the one of highest IoU.

    Returns (matched, extra): reference detections matched, and our detections left over.
    """
    if len(ref.scores) == 0 or len(ours.scores) == 0:
        return 0, len(ours.scores)
    iou = box_iou(torch.tensor(ref.boxes, dtype=torch.float32), torch.tensor(ours.boxes, dtype=torch.float32)).numpy()
    ok = ((iou >= iou_min) & (ref.labels[:, None] == ours.labels[None, :])
          & (np.abs(ref.scores[:, None] - ours.scores[None, :]) <= score_tol))
    used = np.zeros(len(ours.scores), bool)
    matched = 0
    for i in range(len(ref.scores)):
        cand = np.flatnonzero(ok[i] & ~used)
        if cand.size:
            used[cand[np.argmax(iou[i, cand])]] = True
            matched += 1
    return matched, int((~used).sum())


def judge(ref: Detections, ours: Detections, criterion: Criterion) -> tuple[int, int, bool]:
    """(matched, extra, passed) of one image under ``criterion``; an image where the reference found
    nothing does not pass (nothing was checked)."""
    matched, extra = match(ref, ours, criterion.iou_min, criterion.score_tol)
    n = len(ref.scores)
    passed = n > 0 and matched >= criterion.min_matched * n and extra <= criterion.max_extra * n
    return matched, extra, bool(passed)


def assert_parity(ref: Detections, ours: Detections, what: str, min_ref: int = 10) -> None:
    """``PARITY`` as a test assertion, with a floor on torchvision's detection count so that the
    check can't pass on an image without detections."""
    n = len(ref.scores)
    assert n >= min_ref, f"{what}: torchvision found only {n} detections; weak test"
    matched, extra, _ = judge(ref, ours, PARITY)
    assert matched >= PARITY.min_matched * n, f"{what}: matched {matched}/{n} torchvision detections"
    assert extra <= PARITY.max_extra * n, f"{what}: {extra} extra detections beyond torchvision's {n}"


def fp16_overall(rows: list[dict]) -> tuple[int, int, bool]:
    """``FP16`` over a model's per-image rows (``matched`` and ``reference`` counts, as
    :func:`evaluation.accuracy.accuracy_rows` makes them): (matched, reference detections, passed).
    With a few detections per image one miss fails an image, so the criterion counts every detection
    of every image together; passed also needs every image with reference detections at
    :data:`FP16_IMAGE_MIN` or above (:func:`worst_image`)."""
    matched, reference = sum(r["matched"] for r in rows), sum(r["reference"] for r in rows)
    worst = worst_image(rows)
    floor_ok = worst is None or worst[1] >= FP16_IMAGE_MIN
    return matched, reference, reference > 0 and matched >= FP16.min_matched * reference and floor_ok


def worst_image(rows: list[dict]) -> tuple[str, float] | None:
    """(image, matched fraction) of the row with the lowest fraction of its reference detections
    matched, among rows with any; None where no row has one."""
    fractions = [(r["image"], r["matched"] / r["reference"]) for r in rows if r["reference"] > 0]
    return min(fractions, key=lambda f: f[1]) if fractions else None
