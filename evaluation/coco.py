"""COCO box mAP (pycocotools' COCOeval, ``bbox``) of served detections and of torchvision's own.

The pieces of ``fasterrcnn evaluate`` that know nothing of Triton: reading a COCO annotation file,
mapping a model's label ids to its categories by class name, turning detections into COCO
results, evaluating them, and the reference: torchvision ``model.eval()`` with the same weights
and settings as the served repository, on the pixels Pillow decodes.

Detections are ``boxes [D, 4]`` (x1, y1, x2, y2) in original-image pixels, ``scores [D]`` and
``labels [D]`` (the model's label ids, 0 being background); COCO results carry ``bbox`` as
``[x, y, width, height]`` and the annotation file's ``category_id``.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from evaluation.coco_scenes import boxes_xywh

# COCOeval.stats indices: AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@100 (all areas)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
STATS_INDEX = (0, 1, 2, 3, 4, 5, 8)
INSTALL_HINT = ("fasterrcnn evaluate needs pycocotools: pip install 'fasterrcnn-triton[eval]' "
                "(or pip install pycocotools)")
MANIFEST = "provenance.json"  # a repository's record of what built it (exporters/provenance.py)
# settings the reference model must share with the served repository for its detections to be comparable
COMPARED_SETTINGS = ("num_classes", "min_size", "max_size", "image_mean", "image_std", "rpn_pre_nms_top_n",
                     "rpn_post_nms_top_n", "rpn_nms_thresh", "rpn_score_thresh", "box_score_thresh",
                     "box_nms_thresh", "box_detections_per_img")


class EvaluationError(ValueError):
    """An evaluation that can't run as asked; the message says what is missing or wrong."""


def require_pycocotools() -> None:
    """Raise :class:`EvaluationError` (:data:`INSTALL_HINT`) where pycocotools is not installed."""
    try:
        import pycocotools.coco  # noqa: F401
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise EvaluationError(INSTALL_HINT) from None


def read_annotations(path: str | Path) -> dict:
    """A COCO instances file as a dict; raises :class:`EvaluationError` naming what it lacks."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise EvaluationError(f"cannot read the annotations {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"the annotations {path} are not JSON: {e}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise EvaluationError(f"the annotations {path} lack {', '.join(missing)}: expected a COCO instances file")
    if not data["images"]:
        raise EvaluationError(f"the annotations {path} list no images")
    return data


def label_categories(categories: Sequence[Mapping], class_names: Sequence[str]) -> dict[int, int]:
    """{model label id: category id}, matched by name: label ``i`` is ``class_names[i]`` (0 is
    background), a category is ``{"id", "name"}``.  The annotation file's ids are kept, whatever
    they are.  Raises :class:`EvaluationError` naming the category ids that no class has."""
    index = {name: i for i, name in enumerate(class_names) if i > 0}
    missing = [c for c in categories if c["name"] not in index]
    if missing:
        listed = ", ".join(f"{c['id']} ({c['name']!r})" for c in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise EvaluationError(
            f"category ids {listed}{more} of the annotations have no class of that name in the served model "
            f"(its {len(class_names) - 1} classes: {', '.join(map(repr, class_names[1:6]))}...); export with "
            "--class-names FILE naming them")
    return {index[c["name"]]: int(c["id"]) for c in categories}


def to_results(image_id: int, boxes, scores, labels, label_to_category: Mapping[int, int]) -> list[dict]:
    """One image's detections as COCO results; labels of no category (COCO's "N/A" slots, a class
    the annotations leave out) are dropped."""
    xywh = boxes_xywh(boxes)
    out = []
    for box, score, label in zip(xywh, np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)):
        category = label_to_category.get(int(label))
        if category is not None:
            out.append({"image_id": int(image_id), "category_id": category,
                        "bbox": [round(float(v), 4) for v in box], "score": round(float(score), 6)})
    return out


@dataclass
class Evaluation:
    """COCOeval's summary: ``metrics`` by :data:`METRICS` name (None where no ground truth falls in
    the range, COCOeval's -1), ``per_class`` AP@[.5:.95] by category name (None likewise)."""

    metrics: dict[str, float | None]
    per_class: dict[str, float | None] = field(default_factory=dict)


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)


def evaluate(annotations: dict, results: list[dict]) -> Evaluation:
    """COCOeval (``bbox``) of ``results`` against ``annotations`` (a COCO instances dict), quietly
    (pycocotools prints its progress and summary; none of it reaches stdout)."""
    require_pycocotools()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = annotations
        gt.createIndex()
        if results:
            dt = gt.loadRes(results)
        else:  # loadRes can't take an empty list: no detections is a results set with no annotations
            dt = COCO()
            dt.dataset = {"images": annotations["images"], "categories": annotations["categories"], "annotations": []}
            dt.createIndex()
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    metrics = {name: _defined(e.stats[i]) for name, i in zip(METRICS, STATS_INDEX)}
    # precision [IoU thresholds, recall points, categories, areas, max detections]: area "all", 100 detections
    precision = e.eval["precision"][:, :, :, 0, -1]
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    per_class = {}
    for k, category in enumerate(e.params.catIds):
        p = precision[:, :, k]
        per_class[names[category]] = float(p[p > -1].mean()) if (p > -1).any() else None
    return Evaluation(metrics, per_class)


def differences(served: Evaluation, reference: Evaluation) -> dict[str, float | None]:
    """served - reference for every metric (None where either is undefined)."""
    return {k: None if served.metrics[k] is None or reference.metrics[k] is None
            else served.metrics[k] - reference.metrics[k] for k in METRICS}


def classes_that_differ(served: Evaluation, reference: Evaluation, count: int = 5) -> list[tuple[str, float, float]]:
    """The ``count`` categories whose AP differs most, as (name, served AP, reference AP)."""
    rows = [(name, ap, reference.per_class.get(name)) for name, ap in served.per_class.items()]
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    return sorted(rows, key=lambda r: -abs(r[1] - r[2]))[:count]


# ----------------------------------------------------------------------------------------------
# The reference: torchvision with the served repository's weights and settings
# ----------------------------------------------------------------------------------------------

def recorded_weights(repository: str | Path) -> dict:
    """The weights the repository's ``provenance.json`` records: ``{"weights": "coco" | "random" |
    path, "seed": int, "num_classes": int, "arch": builder name or None}``.  Raises
    :class:`EvaluationError` where it records none."""
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist, so the served weights are unknown: pass --weights "
                              "(coco, random with --seed, or the checkpoint the repository was exported from)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"cannot read {path}: {e}") from None
    weights = manifest.get("weights")
    options = manifest.get("options") or {}
    source = weights.get("source") if isinstance(weights, dict) else weights
    if not source:
        raise EvaluationError(f"{path} records no weights (a repository written without the export command): "
                              "pass --weights")
    settings = manifest.get("settings") or {}
    seed = (weights.get("seed") if isinstance(weights, dict) else None) or options.get("seed") or manifest.get("seed")
    return {"weights": str(source), "seed": int(seed or 0),
            "num_classes": int(settings.get("num_classes") or options.get("num_classes") or 91),
            "arch": options.get("arch") or settings.get("arch")}


def reference_model(weights: str, settings, seed: int = 0, device: str = "auto", arch: str | None = None):
    """torchvision's detector ``arch`` (a builder name; None: a checkpoint's own, else
    fasterrcnn_resnet50_fpn) with ``weights`` ("coco", "random" with ``seed``, or a checkpoint) and
    the served ``settings`` (DetectorSettings: resize, thresholds), in eval mode on ``device``
    ("auto": CUDA where there is one).  Raises :class:`EvaluationError` where a setting that
    shapes the detections differs from the served one."""
    import torch

    from exporters.loading import load, settings_from_model
    from exporters.model_options import ModelOptions

    options = ModelOptions(weights=weights, arch=arch, num_classes=settings.num_classes, seed=seed,
                           min_size=settings.min_size, max_size=settings.max_size)
    model = load(options)
    mine = settings_from_model(model)
    differ = [f"{k} {getattr(mine, k)!r} (served {getattr(settings, k)!r})" for k in COMPARED_SETTINGS
              if getattr(mine, k) != getattr(settings, k)]
    if differ:
        raise EvaluationError(f"the reference model with weights {weights!r} differs from the served one: "
                              f"{'; '.join(differ)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def pillow_pixels(path: str | Path) -> np.ndarray:
    """``PIL.Image.open(path).convert("RGB")`` as ``[H, W, 3]`` uint8: what a torchvision user decodes."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def reference_detections(model, paths: Sequence[Path], precision: str = "fp32",
                         tick: Callable[[], None] | None = None) -> Iterator[tuple]:
    """``model([image])`` per file on Pillow's pixels: yields (boxes, scores, labels) as NumPy.

    ``precision``: "fp32" (on CUDA with TF32 off, as the served fp32 runs) or "fp16" (CUDA
    autocast, as torchvision users run half precision).  ``tick`` is called after each image."""
    import torch

    if precision not in ("fp32", "fp16"):
        raise EvaluationError(f"reference precision must be fp32 or fp16, got {precision!r}")
    device = next(model.parameters()).device
    if precision == "fp16" and device.type != "cuda":
        raise EvaluationError("an fp16 reference runs under CUDA autocast: it needs a GPU")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for path in paths:
            x = torch.from_numpy(pillow_pixels(path).copy()).to(device).permute(2, 0, 1).float() / 255
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                out = model([x])[0]
            yield tuple(out[k].float().cpu().numpy() if k != "labels" else out[k].cpu().numpy()
                        for k in ("boxes", "scores", "labels"))
            if tick is not None:
                tick()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
