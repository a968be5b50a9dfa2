"""Shared test helpers: models, images, the ONNX Runtime pipeline and the torchvision parity criterion.

Criterion (the exporters issue): at least 99% of torchvision's detections matched by a
detection of the same label with IoU >= 0.99 and |score difference| <= 1e-3, and no more than
1% extra detections.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from python_backend.reference.image import decode_image, preprocess_batch
from python_backend.steps import postprocess_step, roi_step

MIN_MATCHED = 0.99
MAX_EXTRA = 0.01


@dataclass
class Detections:
    boxes: np.ndarray  # [D, 4]
    scores: np.ndarray  # [D]
    labels: np.ndarray  # [D]


def torchvision_detect(model, image: np.ndarray) -> Detections:
    """``model.eval()([image])`` on one decoded HWC uint8 image, as a user would call it."""
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        out = model([x])[0]
    return Detections(out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy())


def from_packed(boxes, scores, labels, num) -> Detections:
    n = int(np.asarray(num).reshape(-1)[0])
    return Detections(np.asarray(boxes).reshape(-1, 4)[:n], np.asarray(scores).reshape(-1)[:n],
                      np.asarray(labels).reshape(-1)[:n].astype(np.int64))


def match(ref: Detections, ours: Detections, iou_min: float = 0.99, score_tol: float = 1e-3):
    """Greedy one-to-one matching in torchvision's (descending score) order.

    Returns (matched, extra): torchvision detections matched, and our detections left over.
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


def assert_parity(ref: Detections, ours: Detections, what: str, min_ref: int = 10) -> None:
    """The project's acceptance criterion, with a floor on torchvision's detection count so the
    check can't pass on an image without detections."""
    assert len(ref.scores) >= min_ref, f"{what}: torchvision found only {len(ref.scores)} detections; weak test"
    matched, extra = match(ref, ours)
    n = len(ref.scores)
    assert matched >= MIN_MATCHED * n, f"{what}: matched {matched}/{n} torchvision detections"
    assert extra <= MAX_EXTRA * n, f"{what}: {extra} extra detections beyond torchvision's {n}"


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def textured_image(height: int, width: int, seed: int) -> np.ndarray:
    """A synthetic photo-like image: smooth color blobs plus noise, so no two regions tie."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.1, 0.5) * max(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(0, 255, 3)
    img = img / max(img.max(), 1e-6) * 200 + rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


class OnnxPipeline:
    """ONNX Runtime rpn -> NumPy roi step -> ONNX Runtime header -> NumPy postprocess."""

    def __init__(self, rpn_path, header_path, settings):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        self.rpn = ort.InferenceSession(str(rpn_path), opts, providers=["CPUExecutionProvider"])
        self.header = ort.InferenceSession(str(header_path), opts, providers=["CPUExecutionProvider"])
        self.settings = settings

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        s = self.settings
        x, sizes, originals = preprocess_batch(images, s)
        proposals, *features = self.rpn.run(None, {"images": x, "image_sizes": sizes})
        batch = roi_step(proposals, features, sizes, s)
        scores, boxes = self.header.run(None, {"roi_features": batch.features, "rois": batch.rois})
        out, start = [], 0
        for i, n in enumerate(batch.counts):
            out.append(from_packed(*postprocess_step(scores[start:start + n], boxes[start:start + n],
                                                     sizes[i], originals[i], s)))
            start += n
        return out

    def from_bytes(self, payloads: list[bytes]) -> list[Detections]:
        s = self.settings
        return self([decode_image(p, s.max_input_pixels, s.min_input_side) for p in payloads])
