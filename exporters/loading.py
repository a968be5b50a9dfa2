"""Load a torchvision Faster R-CNN (any builder of :mod:`exporters.builders`) from a checkpoint,
COCO weights or a seed.

The detector's settings (transform sizes, RPN and box-head thresholds) are read from the
loaded model object into :class:`~python_backend.settings.DetectorSettings`, which travels with
the exported artifacts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torchvision.models.detection import FasterRCNN

from python_backend.settings import DetectorSettings, coco_class_names

from . import builders, structure
from .builders import DEFAULT_ARCH


CheckpointError = builders.CheckpointError  # a checkpoint the exporters can't load; the message says why


class CocoWeightsUnavailable(OSError):
    """torchvision's COCO weights are not in torch's cache and can't be downloaded; the message
    names the alternatives and the cache path."""


def _settings_kwargs(kwargs: dict) -> dict:
    # fasterrcnn_resnet50_fpn forwards these keyword arguments to FasterRCNN
    return {k: v for k, v in kwargs.items() if v is not None}


def random_model(num_classes: int = 91, seed: int = 0, peaky: float = 1.0, arch: str = DEFAULT_ARCH,
                 **model_kwargs) -> FasterRCNN:
    """Seeded random weights (no download), backbone included (``weights_backbone=None``).

    A test needs many detections with distinct scores.  A classifier whose logits barely
    differ gives every class about 1/C (under the 0.05 threshold for COCO's 91 classes: no
    detections), one whose logits differ hugely gives scores of exactly 1.0 (ties).  ``peaky``
    multiplies the classifier weights, which scales the logits' spread.  Measured with seed 0
    at min_size 256 on scikit-image's astronaut (91 classes, 100 detections each):
    peaky 0.5 -> scores 0.19..0.40; 1.0 -> 0.42..0.92, 100 distinct, 8 labels;
    2 -> 0.75..0.999; 4 -> up to 1.0 with ties; 20 -> all 1.0.  The random backbone's
    un-normalized activations already spread the logits, so 1.0 (torchvision's init) is the default.
    ``arch``: the builder (:data:`exporters.builders.ARCHS`).
    Other builders' random backbones (batch norms at their initial statistics) shrink the maps
    until every RoI scores the same, so their norms take the statistics of a seeded noise batch
    (:func:`calibrate_norms`), as a trained backbone's would be of its data.
    """
    torch.manual_seed(seed)
    model = builders.build(arch, num_classes=num_classes, **_settings_kwargs(model_kwargs))
    if arch != DEFAULT_ARCH:
        calibrate_norms(model, seed)
    if peaky != 1.0:
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.weight.mul_(peaky)
    return model.eval()


@torch.no_grad()
def calibrate_norms(model: FasterRCNN, seed: int = 0, size: int = 256) -> int:
    """Give each BatchNorm2d of the backbone the statistics of a seeded batch of two noise images
    (normalized as the transform would), then eval mode; returns how many."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: the batch's own statistics
        m.train()
    model.backbone((torch.rand(2, 3, size, size, generator=g) - 0.45) / 0.225)
    for m in norms:
        m.momentum = 0.1
        m.eval()
    return len(norms)


def coco_model(arch: str = DEFAULT_ARCH, **model_kwargs) -> FasterRCNN:
    """torchvision's COCO weights of builder ``arch``, through torchvision's own download and cache.

    Raises :class:`CocoWeightsUnavailable` when they are not cached and the download fails.
    """
    weights = builders.coco_weights(arch)
    try:
        # The weights' only I/O is torch.hub's cache lookup and download; the network's failures
        # (no route, DNS, proxy, HTTP errors) all arrive as OSError (urllib's URLError included).
        model = torchvision.models.get_model(arch, weights=weights, **_settings_kwargs(model_kwargs))
    except OSError as e:
        path = coco_weights_path(arch)
        raise CocoWeightsUnavailable(
            f"cannot download torchvision's COCO weights from {weights.url} ({e}); use --weights random "
            f"(seeded random weights, offline), --weights PATH (a {arch} state_dict), "
            f"or copy that file to {path}"
        ) from e
    return model.eval()


def coco_weights_path(arch: str = DEFAULT_ARCH) -> Path:
    """Where torchvision's COCO checkpoint of ``arch`` is (or would be) in torch's hub cache."""
    url = builders.coco_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def coco_weights_cached(arch: str = DEFAULT_ARCH) -> Path | None:
    """Path of torchvision's COCO checkpoint of ``arch`` in torch's hub cache, or None."""
    path = coco_weights_path(arch)
    return path if path.is_file() else None


def checkpoint_model(path: str | os.PathLike, arch: str | None = None, **model_kwargs) -> FasterRCNN:
    """A state_dict saved from a builder of :mod:`exporters.builders`: ``arch``, or the one the
    checkpoint records or its keys and shapes show; the number of classes comes from it.

    Accepts a bare state_dict or a dict holding one under ``"model"`` or ``"state_dict"``.
    Raises :class:`CheckpointError` (one sentence: what was found, what is expected, how to fix)
    for a missing, damaged, text or pickled-model file, and for a state_dict of another model.
    """
    return builders.checkpoint_model(path, arch, **_settings_kwargs(model_kwargs))


def load(options) -> FasterRCNN:
    """The torchvision model an :class:`~exporters.model_options.ModelOptions` names, in eval mode
    (raises :class:`CheckpointError` for a bad checkpoint)."""
    sizes = {"min_size": options.min_size, "max_size": options.max_size}
    arch = options.arch or DEFAULT_ARCH
    if options.weights == "random":
        return random_model(options.num_classes, seed=options.seed, arch=arch, **sizes)
    if options.weights == "coco":
        return coco_model(arch, **sizes)
    return checkpoint_model(options.weights, options.arch, **sizes)


def read_class_names(path: str | os.PathLike | None, num_classes: int) -> tuple[str, ...]:
    """Class names, one per line, background first; COCO's names when ``path`` is None and the
    model has COCO's 91 classes; ``class_<i>`` otherwise."""
    if path is not None:
        names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
        if len(names) != num_classes:
            raise CheckpointError(
                f"class names file {path} has {len(names)} names, expected {num_classes} (background first)"
            )
        return names
    if num_classes == 91:
        return coco_class_names()
    return ("__background__",) + tuple(f"class_{i}" for i in range(1, num_classes))


def settings_from_model(model: FasterRCNN, canvases: str | Sequence[Sequence[int]] = "auto",
                        class_names: Sequence[str] = ()) -> DetectorSettings:
    """Read every setting the serving pipeline needs from the model object.

    ``canvases``: the (height, width) pairs the rpn runs on, or ``"auto"``
    (:func:`python_backend.settings.default_canvases` of the model's resize sizes).  The
    structure (strides, anchors, pooled maps, heads) comes from :func:`exporters.structure.describe`,
    which raises :class:`~exporters.structure.UnsupportedModel` for what can't be served."""
    found = structure.describe(model)
    t = model.transform
    rpn = model.rpn
    heads = model.roi_heads
    pooler = heads.box_roi_pool
    min_size = t.min_size[-1] if isinstance(t.min_size, (tuple, list)) else t.min_size
    num_classes = int(heads.box_predictor.cls_score.out_features)
    return DetectorSettings(
        num_classes=num_classes,
        canvases=canvases if isinstance(canvases, str) else tuple((int(h), int(w)) for h, w in canvases),
        min_size=int(min_size),
        max_size=int(t.max_size),
        image_mean=tuple(float(v) for v in t.image_mean),
        image_std=tuple(float(v) for v in t.image_std),
        rpn_pre_nms_top_n=int(rpn._pre_nms_top_n["testing"]),
        rpn_post_nms_top_n=int(rpn._post_nms_top_n["testing"]),
        rpn_nms_thresh=float(rpn.nms_thresh),
        rpn_score_thresh=float(rpn.score_thresh),
        rpn_min_size=float(rpn.min_size),
        box_score_thresh=float(heads.score_thresh),
        box_nms_thresh=float(heads.nms_thresh),
        box_detections_per_img=int(heads.detections_per_img),
        roi_output_size=int(pooler.output_size[0]),
        roi_sampling_ratio=int(pooler.sampling_ratio),
        canonical_scale=int(getattr(pooler, "canonical_scale", 224)),
        canonical_level=int(getattr(pooler, "canonical_level", 4)),
        box_coder_weights=tuple(float(w) for w in heads.box_coder.weights),
        class_names=tuple(class_names),
        **found,
    )
