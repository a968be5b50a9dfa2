"""Served detections against torchvision eager, image by image, judged by :mod:`evaluation.parity`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.parity import Criterion, Detections, from_packed, judge, torchvision_detect
from python_backend import names


def eager_reference(weights: Path, images: dict[str, np.ndarray], device: str = "cuda") -> dict[str, Detections]:
    """torchvision eager fp32 with TF32 off on ``device`` (``weights``: a state_dict, read by
    ``exporters.loading.checkpoint_model``): {image name: detections}."""
    import torch

    from exporters.loading import checkpoint_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = checkpoint_model(weights).to(device).eval()
    out = {name: torchvision_detect(model, image) for name, image in images.items()}
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return out


def served_detections(client, model: str, payloads: dict, concurrency: int = 4) -> dict[str, Detections]:
    """Each payload (encoded bytes or a decoded HWC uint8 array) as its own request to ``model``,
    ``concurrency`` in flight (so that Triton batches them): {payload name: detections}.

    Raises RuntimeError naming the first payload whose request failed.
    """
    from client.detect import infer_many

    results = infer_many(client, list(payloads.values()), concurrency, model)
    out = {}
    for name, res in zip(payloads, results):
        if isinstance(res, Exception):
            raise RuntimeError(f"{model} failed on {name}: {res}")
        out[name] = from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                             names.DETECTION_LABELS, names.NUM_DETECTIONS)))
    return out


def accuracy_rows(name: str, reference: dict[str, Detections], ours: dict[str, Detections],
                  criterion: Criterion) -> list[dict]:
    """One row per image of ``reference``: detection counts, matched, extra, and whether the image
    passes ``criterion`` (the tables' columns)."""
    rows = []
    for image, ref in reference.items():
        matched, extra, passed = judge(ref, ours[image], criterion)
        rows.append({"model": name, "image": image, "reference": len(ref.scores), "ours": len(ours[image].scores),
                     "matched": matched, "extra": extra, "criterion": criterion.name, "pass": passed})
    return rows
