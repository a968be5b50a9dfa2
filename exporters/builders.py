"""torchvision's Faster R-CNN builders by name, and which one a checkpoint was saved from.

:func:`build` loads every builder the same way, through torchvision's model registry
(``torchvision.models.get_model``).  :func:`read_checkpoint` reads a ``state_dict`` and says in
one sentence what is wrong with a file that isn't one; :func:`infer_arch` tells the builder from
the state_dict's keys and shapes, or says what the checkpoint looks like and which ``--arch``
values there are.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import FasterRCNN

from .model_options import DEFAULT_ARCH  # noqa: F401  (defined there, for the command line)

# builder -> what sets it apart, for messages
ARCHS = {
    "fasterrcnn_resnet50_fpn": "ResNet-50 FPN, one-conv RPN head, TwoMLPHead box head",
    "fasterrcnn_resnet50_fpn_v2": "ResNet-50 FPN with batch norms, two-conv RPN head, FastRCNNConvFCHead box head",
    "fasterrcnn_mobilenet_v3_large_fpn": "MobileNetV3-Large FPN at 800/1333",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "MobileNetV3-Large FPN at 320/640",
}
EXPECTED = ("a state_dict (torch.save(model.state_dict(), path)) of one of the builders "
            f"{', '.join(ARCHS)}, or a dict holding one under 'model' or 'state_dict'")


class CheckpointError(ValueError):
    """A checkpoint the exporters can't load; the message says what was found, what is expected
    and how to fix it."""


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; expected one of {', '.join(ARCHS)} (a custom FasterRCNN: "
                         "exporters.api.export_model)")
    return arch


def build(arch: str = DEFAULT_ARCH, num_classes: int = 91, **kwargs) -> FasterRCNN:
    """``arch``'s model with no weights (backbone included), ``num_classes`` classes; keyword
    arguments go to :class:`~torchvision.models.detection.FasterRCNN` (min_size, max_size, ...)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return torchvision.models.get_model(check_arch(arch), weights=None, weights_backbone=None,
                                        num_classes=num_classes, **kwargs)


def coco_weights(arch: str = DEFAULT_ARCH):
    """The builder's COCO weights enum member (``weights=`` of torchvision's builder)."""
    return torchvision.models.get_model_weights(check_arch(arch)).DEFAULT


def _looks_like_text(path: Path) -> bool:
    head = path.open("rb").read(512)
    return bool(head) and b"\0" not in head and all(b >= 9 for b in head)


def _first_sentence(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0].rstrip(".")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, str | None]:
    """(state_dict, the builder's name where the checkpoint records one).

    Accepts a bare state_dict, or a dict holding one under ``"model"`` or ``"state_dict"``
    (torchvision's reference scripts save ``{"model": ..., "args": Namespace(model=NAME), ...}``:
    their ``args.model`` names the builder).  Raises :class:`CheckpointError`, one sentence each,
    for a missing, corrupt, text or pickled-model file and for anything but tensors."""
    path = Path(path)
    fix = "save it with torch.save(model.state_dict(), path)"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; expected {EXPECTED}")
    if _looks_like_text(path):
        raise CheckpointError(f"checkpoint {path} is a text file, not a PyTorch checkpoint; expected {EXPECTED}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} holds a pickled Python object (a whole model?), not a state_dict; expected "
                f"{EXPECTED}: load it where its code is and {fix}") from None
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint or is damaged (torch.load: "
                              f"{_first_sentence(e)}); expected {EXPECTED}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated (torch.load: {_first_sentence(e)}); "
                              f"expected {EXPECTED}") from None
    arch = None
    if isinstance(state, dict):
        args = state.get("args")
        arch = state.get("arch") or (getattr(args, "model", None) if args is not None else None)
        if isinstance(args, dict):
            arch = arch or args.get("model")
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__} that is not a state_dict of tensors; "
                              f"expected {EXPECTED}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel
    for old in ("weight", "bias"):  # RPNHead before torchvision 0.13 (its _load_from_state_dict upgrades it too)
        if f"rpn.head.conv.{old}" in state:
            state[f"rpn.head.conv.0.0.{old}"] = state.pop(f"rpn.head.conv.{old}")
    return state, arch if isinstance(arch, str) and arch in ARCHS else None


def describe_state(state: dict) -> str:
    """What a state_dict looks like, in words (for errors)."""
    keys = list(state)
    if not any(k.startswith("roi_heads.box_predictor.") for k in keys):
        tops = sorted({k.split(".")[0] for k in keys})
        kind = "a RetinaNet, FCOS or SSD" if "head" in tops else "a model that is not a Faster R-CNN"
        if any(k.startswith("roi_heads.mask_") or k.startswith("roi_heads.keypoint_") for k in keys):
            kind = "a Mask or Keypoint R-CNN"
        return f"{kind} (top-level modules {tops[:8]})"
    if any(k.startswith("roi_heads.mask_") or k.startswith("roi_heads.keypoint_") for k in keys):
        return "a Mask or Keypoint R-CNN (roi_heads has a mask or keypoint head)"
    if "backbone.body.conv1.weight" in keys:
        depth = sum(1 for k in keys if k.startswith("backbone.body.layer3.") and k.endswith(".conv1.weight"))
        name = {6: "ResNet-50", 23: "ResNet-101", 36: "ResNet-152", 2: "ResNet-18/34"}.get(depth, "ResNet")
        layers = sorted({k.split(".")[2] for k in keys if k.startswith("backbone.body.layer")})
        fpn = sum(1 for k in keys if k.startswith("backbone.fpn.inner_blocks.") and k.endswith(".weight")
                  and state[k].ndim == 4)
        v2 = "roi_heads.box_head.0.0.weight" in keys
        return (f"a ResNet FPN Faster R-CNN ({name} body with {', '.join(layers)}, {fpn} FPN inputs, "
                f"{'v2 heads' if v2 else 'TwoMLPHead box head'})")
    if "backbone.body.0.0.weight" in keys:
        return "a MobileNet FPN Faster R-CNN"
    return "a Faster R-CNN with an unknown backbone"


def infer_arch(state: dict, path: str | os.PathLike = "checkpoint") -> str:
    """The builder whose ``state_dict()`` has exactly ``state``'s keys and shapes (num_classes
    aside, which the checkpoint gives).  Raises :class:`CheckpointError` naming what the
    checkpoint looks like and the ``--arch`` values when none or several fit."""
    num_classes = _num_classes(state, path)
    fits = []
    for arch in ARCHS:
        if arch == "fasterrcnn_mobilenet_v3_large_320_fpn" and fits[-1:] == ["fasterrcnn_mobilenet_v3_large_fpn"]:
            fits.append(arch)  # the same network at another resize: the same keys and shapes
            continue
        if _reference_shapes(arch, num_classes) == _shapes(state):
            fits.append(arch)
    if len(fits) == 1:
        return fits[0]
    looks = describe_state(state)
    if fits:
        raise CheckpointError(
            f"checkpoint {path} fits {' and '.join(fits)} alike (the same network at different resize sizes); "
            f"choose one with --arch ({', '.join(ARCHS)})")
    raise CheckpointError(
        f"checkpoint {path} looks like {looks}, which is not the state_dict of any of the builders "
        f"{', '.join(ARCHS)}; pass --arch if it is one of them, or export a custom FasterRCNN through "
        "exporters.api.export_model(model, out)")


def _num_classes(state: dict, path) -> int:
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    if cls is None:
        raise CheckpointError(f"checkpoint {path} looks like {describe_state(state)}: it has no "
                              f"'roi_heads.box_predictor.cls_score.weight'; expected {EXPECTED}")
    num_classes = int(cls.shape[0])
    bbox = state.get("roi_heads.box_predictor.bbox_pred.weight")
    if bbox is None or bbox.shape[0] != 4 * num_classes:
        got = None if bbox is None else int(bbox.shape[0])
        raise CheckpointError(f"checkpoint {path}: bbox_pred has {got} outputs, expected 4 x {num_classes} classes "
                              "(cls_score's); the box predictor is damaged or not torchvision's FastRCNNPredictor")
    return num_classes


_SHAPES: dict = {}
# BatchNorm2d's counter: absent from FrozenBatchNorm2d (pretrained builds) and filled in by
# BatchNorm2d's own loading when missing, so never a difference
_COUNTER = "num_batches_tracked"


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith(_COUNTER)}


def _reference_shapes(arch: str, num_classes: int) -> dict:
    if arch not in _SHAPES:
        with torch.device("meta"):  # shapes only, no memory and no initialization cost
            model = build(arch, num_classes=2)
        _SHAPES[arch] = _shapes(model.state_dict())
    shapes = dict(_SHAPES[arch])
    for k, v in list(shapes.items()):
        if k.startswith("roi_heads.box_predictor."):
            shapes[k] = (v[0] // 2 * num_classes,) + v[1:]
    return shapes


def checkpoint_model(path: str | os.PathLike, arch: str | None = None, **kwargs) -> FasterRCNN:
    """The model of a checkpoint (:func:`read_checkpoint`), its builder ``arch`` or the one
    recorded in or inferred from it (:func:`infer_arch`); keyword arguments as :func:`build`."""
    state, recorded = read_checkpoint(path)
    arch = check_arch(arch) if arch is not None else recorded or infer_arch(state, path)
    num_classes = _num_classes(state, path)
    model = build(arch, num_classes=num_classes, **kwargs)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith(_COUNTER)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.endswith(_COUNTER)]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        what = (f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else
                f"{len(shapes)} tensors of other shapes (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)}, "
                f"expected {tuple(expected[shapes[0]].shape)})")
        raise CheckpointError(f"checkpoint {path} is not a {arch} state_dict: it has {what} and looks like "
                              f"{describe_state(state)}; pass the --arch it was saved from ({', '.join(ARCHS)})")
    model.load_state_dict(state)
    return model.eval()
