"""A Faster R-CNN's structure, read from the model object: what the split networks, the steps'
settings and the operators need, nothing assumed.

torchvision derives its geometry from tensors, and so does this: the strides of the backbone's
maps from their shapes on a probe image (``AnchorGenerator.forward``: ``image_size // grid``;
``ops/poolers.py`` ``_infer_scale``: ``2 ** round(log2(map / image))``), the pooled maps from
``box_roi_pool.featmap_names`` as ``_filter_input`` keeps them (the backbone's output order), the
anchors from the anchor generator, the channels from ``backbone.out_channels``, the padding from
``transform.size_divisible``.

What the serving pipeline can't reproduce is refused by :func:`check_supported` with an
:class:`UnsupportedModel` that names the module and what is supported.  The rpn network's
extent masks (``exporters/split.py``) must know every module of the backbone and the RPN head:
each spatial conv and max pool reads zeros beyond each image's extent, each global average pool
(MobileNetV3's SqueezeExcitation) averages over the extent only, and everything else works cell
by cell.  A module it does not know could mix cells across that extent, so it is refused.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import mobilenetv2, mobilenetv3, resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, misc
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool


class UnsupportedModel(ValueError):
    """A model the serving pipeline can't reproduce exactly; the message names the module and
    what is supported."""


# Modules whose forward reads each cell alone, or composes the modules below it and
# torchvision's cell-aligned functions (FPN's nearest upsampling by 2, LastLevelMaxPool's kernel 1).
CELLWISE = (nn.BatchNorm2d, misc.FrozenBatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU,
            nn.Sigmoid, nn.Identity, nn.Dropout)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, IntermediateLayerGetter, BackboneWithFPN,
              FeaturePyramidNetwork, LastLevelMaxPool, resnet.Bottleneck, resnet.BasicBlock,
              mobilenetv3.InvertedResidual, mobilenetv2.InvertedResidual, misc.SqueezeExcitation,
              misc.Conv2dNormActivation, RPNHead)
MASKED = "Conv2d (zero padding), MaxPool2d, AdaptiveAvgPool2d(1)"
BOX_HEADS = (TwoMLPHead, FastRCNNConvFCHead)
PROBE = (8, 12)  # the probe image's (height, width) in multiples of size_divisible


def _names(types) -> str:
    return ", ".join(t.__name__ for t in types)


def supported_modules() -> str:
    """What the extent masks handle, for error messages."""
    return f"{MASKED}; cell by cell: {_names(CELLWISE)}; composed: {_names(CONTAINERS)}"


def is_global_pool(m: nn.Module) -> bool:
    size = getattr(m, "output_size", None)
    return isinstance(m, nn.AdaptiveAvgPool2d) and size in (1, (1, 1))


def check_maskable(module: nn.Module, where: str) -> None:
    """Raise :class:`UnsupportedModel` for the first module under ``module`` the extent masks
    don't know (``where``: its attribute path in the detector, for the message)."""
    for name, m in module.named_modules():
        path = f"{where}.{name}" if name else where
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise UnsupportedModel(f"{path} is a Conv2d with padding_mode={m.padding_mode!r}; the rpn's extent "
                                       "masks reproduce zero padding only")
            continue
        if isinstance(m, nn.MaxPool2d):
            if m.ceil_mode:
                raise UnsupportedModel(f"{path} is a MaxPool2d with ceil_mode=True; supported: ceil_mode=False")
            continue
        if is_global_pool(m) or isinstance(m, CELLWISE) or type(m) in CONTAINERS:
            continue
        raise UnsupportedModel(
            f"{path} is a {type(m).__module__}.{type(m).__qualname__}, which the rpn's extent masks don't "
            f"know (its result could depend on the canvas an image is padded onto); supported: {supported_modules()}"
        )


def backbone_maps(backbone: nn.Module, images: Tensor) -> "OrderedDict[str, Tensor]":
    """The backbone's output as torchvision's GeneralizedRCNN takes it: a lone tensor is map ``"0"``."""
    out = backbone(images)
    return OrderedDict([("0", out)]) if isinstance(out, Tensor) else out


@torch.no_grad()
def probe_strides(backbone: nn.Module, size_divisible: int) -> "OrderedDict[str, int]":
    """{map name: stride} of the backbone's outputs, measured on a zero image of PROBE x
    size_divisible pixels: ``2 ** round(log2(image / map))`` per side (torchvision ``_infer_scale``).

    Raises :class:`UnsupportedModel` where a map's two sides give different strides, or where its
    size is not ``ceil(image / stride)`` (the rounding every step of the canvas arithmetic assumes)."""
    h, w = PROBE[0] * size_divisible, PROBE[1] * size_divisible
    param = next(backbone.parameters(), None)
    images = torch.zeros(1, 3, h, w, dtype=torch.float32, device=param.device if param is not None else None)
    out = OrderedDict()
    for name, x in backbone_maps(backbone.eval(), images).items():
        mh, mw = int(x.shape[-2]), int(x.shape[-1])
        sy, sx = (2 ** round(float(torch.tensor(n / m).log2())) for n, m in ((h, mh), (w, mw)))
        if sy != sx or (mh, mw) != (-(-h // sy), -(-w // sx)):
            raise UnsupportedModel(
                f"backbone output {name!r} is {mh}x{mw} on a {h}x{w} probe image: expected ceil({h}/s) x ceil({w}/s) "
                "for one power-of-two stride s")
        out[name] = sy
    return out


def _anchor_structure(model: FasterRCNN, levels: int) -> dict:
    gen = model.rpn.anchor_generator
    if type(gen) is not AnchorGenerator:
        raise UnsupportedModel(f"rpn.anchor_generator is a {type(gen).__qualname__}; supported: "
                               "torchvision's AnchorGenerator")
    if len(gen.sizes) != levels or len(gen.cell_anchors) != levels:
        raise UnsupportedModel(f"rpn.anchor_generator has anchors for {len(gen.sizes)} maps and the backbone "
                               f"returns {levels}; torchvision's AnchorGenerator needs one set per map")
    per_cell = gen.num_anchors_per_location()
    if len(set(per_cell)) != 1:
        raise UnsupportedModel(f"rpn.anchor_generator has {per_cell} anchors per location on its maps; RPNHead "
                               "predicts the same number on every map")
    head = model.rpn.head
    if type(head) is not RPNHead:
        raise UnsupportedModel(f"rpn.head is a {type(head).__qualname__}; supported: torchvision's RPNHead "
                               "(conv_depth 1, or v2's 2)")
    if head.cls_logits.out_channels != per_cell[0]:
        raise UnsupportedModel(f"rpn.head predicts {head.cls_logits.out_channels} anchors per location, its "
                               f"anchor generator makes {per_cell[0]}")
    return dict(
        rpn_anchors_per_cell=int(per_cell[0]),
        rpn_anchor_sizes=tuple(tuple(float(s) for s in sizes) for sizes in gen.sizes),
        rpn_aspect_ratios=tuple(tuple(float(a) for a in ratios) for ratios in gen.aspect_ratios),
        rpn_head_convs=len(head.conv),
    )


def _roi_structure(model: FasterRCNN, strides: "OrderedDict[str, int]", size_divisible: int) -> dict:
    heads = model.roi_heads
    if heads.has_mask() or heads.has_keypoint():
        raise UnsupportedModel(f"{type(model).__qualname__} has a mask or keypoint head; supported: FasterRCNN "
                               "(boxes, scores and labels)")
    pool = heads.box_roi_pool
    if type(pool) is not MultiScaleRoIAlign:
        raise UnsupportedModel(f"roi_heads.box_roi_pool is a {type(pool).__qualname__}; supported: MultiScaleRoIAlign")
    size = tuple(pool.output_size)
    if len(set(size)) != 1 or int(pool.sampling_ratio) <= 0:
        raise UnsupportedModel(f"roi_heads.box_roi_pool has output_size {size} and sampling_ratio "
                               f"{pool.sampling_ratio}; supported: a square output and sampling_ratio > 0")
    pooled = [(k, s) for k, s in strides.items() if k in pool.featmap_names]  # torchvision _filter_input
    if not pooled:
        raise UnsupportedModel(f"roi_heads.box_roi_pool pools the maps {list(pool.featmap_names)}, none of which "
                               f"the backbone returns ({list(strides)})")
    if any(a > b for (_, a), (_, b) in zip(pooled, pooled[1:])) or pooled[-1][1] > size_divisible:
        raise UnsupportedModel(f"roi_heads.box_roi_pool pools maps of strides {[s for _, s in pooled]}; supported: "
                               f"non-decreasing strides of at most size_divisible ({size_divisible}), whose scale "
                               "torchvision infers the same for every image")
    if type(heads.box_head) not in BOX_HEADS:
        raise UnsupportedModel(f"roi_heads.box_head is a {type(heads.box_head).__qualname__}; supported: "
                               f"{_names(BOX_HEADS)}")
    if type(heads.box_predictor) is not FastRCNNPredictor:
        raise UnsupportedModel(f"roi_heads.box_predictor is a {type(heads.box_predictor).__qualname__}; "
                               "supported: FastRCNNPredictor")
    return dict(roi_featmap_names=tuple(k for k, _ in pooled), roi_strides=tuple(s for _, s in pooled),
                box_head=type(heads.box_head).__name__)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModel` unless ``model`` is a FasterRCNN whose backbone and RPN
    head the rpn's extent masks know (:func:`check_maskable`)."""
    if not isinstance(model, FasterRCNN):
        raise UnsupportedModel(f"expected a torchvision FasterRCNN, got a {type(model).__qualname__}")
    t = model.transform
    if t.fixed_size is not None:
        raise UnsupportedModel(f"transform has fixed_size={t.fixed_size}; supported: min_size/max_size resizing")
    check_maskable(model.backbone, "backbone")
    check_maskable(model.rpn.head, "rpn.head")


def describe(model: FasterRCNN) -> dict:
    """The structure fields of :class:`~python_backend.settings.DetectorSettings`, read from the
    model (one probe pass of its backbone).  Raises :class:`UnsupportedModel`."""
    check_supported(model)
    size_divisible = int(model.transform.size_divisible)
    strides = probe_strides(model.backbone, size_divisible)
    return dict(size_divisible=size_divisible, rpn_strides=tuple(strides.values()),
                fpn_channels=int(model.backbone.out_channels),
                **_anchor_structure(model, len(strides)), **_roi_structure(model, strides, size_divisible))
