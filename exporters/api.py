"""Export a FasterRCNN model object: the Python API for models no builder name describes.

A custom ``FasterRCNN(resnet_fpn_backbone(...), ...)`` (another ResNet depth, other returned
layers, other anchors, a dilated last stage, its own min/max size) has no ``--arch``; build it,
load its weights, and give the object to :func:`export_model`::

    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from exporters.api import export_model

    model = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet101", weights=None), num_classes=5)
    model.load_state_dict(torch.load("my_checkpoint.pt"))
    export_model(model, "model_repository")  # then: tritonserver --model-repository model_repository

Its structure (strides measured from the backbone, the pooled maps, anchors, heads, resize)
is read from the object (:mod:`exporters.structure`); what the pipeline can't reproduce is
refused with :class:`~exporters.structure.UnsupportedModel` before anything is written.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import loading, provenance
from .export import ModelOptions, export_loaded
from .repository_options import RepositoryOptions
from .structure import UnsupportedModel, check_supported

__all__ = ["export_model", "load_model_object", "UnsupportedModel"]


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state_dict (names, dtypes, shapes and bytes): names its weights in
    the repository's provenance and cache keys."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _ObjectWeights(ModelOptions):
    """ModelOptions of an in-memory model: its weights are named by their digest."""

    def digest(self) -> str:
        return self.weights.split(":", 1)[1]

    def weights_record(self) -> dict:
        return provenance.weights_record(self.weights, self.digest(), None, self.num_classes)


def load_model_object(model: nn.Module, canvases: str | Sequence[Sequence[int]] = "auto",
                      class_names: Sequence[str] | str | None = None):
    """(model in eval mode, DetectorSettings) of a model object, as :func:`exporters.export.load_model`
    gives them for a checkpoint.  ``class_names``: a sequence (background first), a file of one name
    per line, or None (COCO's for 91 classes, else ``class_<i>``)."""
    check_supported(model)
    model = model.eval()
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    if class_names is None or isinstance(class_names, (str, Path)):
        names = loading.read_class_names(class_names, num_classes)
    else:
        names = tuple(class_names)
    return model, loading.settings_from_model(model, canvases, names)


def export_model(model: nn.Module, out: str | Path, repo: RepositoryOptions | None = None, *,
                 canvases: str | Sequence[Sequence[int]] = "auto", class_names: Sequence[str] | str | None = None,
                 work_dir: str | Path | None = None) -> Path:
    """Write a model repository for the torchvision ``FasterRCNN`` object ``model`` to ``out``.

    ``repo``: the repository's options (target, device, instances; default
    ``RepositoryOptions()``: ONNX Runtime in the python backend, CPU).  ``canvases``: "auto" or
    ((height, width), ...).  Raises :class:`~exporters.structure.UnsupportedModel` naming the
    module that can't be served.  Returns ``out``, a repository for ``tritonserver --model-repository out``
    (``fasterrcnn serve`` re-exports a repository its own options didn't make).
    """
    model, settings = load_model_object(model, canvases, class_names)
    weights = _ObjectWeights(weights=f"{type(model).__qualname__}:{state_digest(model)}",
                             num_classes=settings.num_classes, canvases=settings.canvases)
    return export_loaded(model, settings, weights, repo or RepositoryOptions(), out, work_dir=work_dir)
