"""Checkpoints: the builder inferred from a state_dict's keys and shapes, and one plain sentence
for each file that isn't a loadable checkpoint (what was found, what is expected, how to fix)."""
from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from exporters import builders
from exporters.builders import ARCHS, CheckpointError, checkpoint_model, infer_arch
from exporters.structure import UnsupportedModel, check_supported


@pytest.fixture(scope="module")
def states():
    """{arch: state_dict with 5 classes} of every builder (random weights)."""
    torch.manual_seed(0)
    return {arch: builders.build(arch, num_classes=5).state_dict() for arch in ARCHS}


@pytest.mark.parametrize("arch", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2"])
def test_builder_inferred_from_keys_and_shapes(states, arch, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(states[arch], path)
    assert infer_arch(states[arch]) == arch
    model = checkpoint_model(path, min_size=256, max_size=320)
    assert int(model.roi_heads.box_predictor.cls_score.out_features) == 5
    assert all(torch.equal(v, states[arch][k]) for k, v in model.state_dict().items() if k in states[arch])


def test_mobilenet_checkpoints_need_arch_unless_recorded(states, tmp_path):
    """The 800/1333 and 320/640 MobileNetV3 builders have the same weights: without a record of
    which, the error names both; torchvision's reference scripts record it as ``args.model``."""
    state = states["fasterrcnn_mobilenet_v3_large_fpn"]
    with pytest.raises(CheckpointError, match=r"fits fasterrcnn_mobilenet_v3_large_fpn and "
                                              r"fasterrcnn_mobilenet_v3_large_320_fpn alike.*--arch"):
        infer_arch(state)
    path = tmp_path / "reference_script.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="fasterrcnn_mobilenet_v3_large_320_fpn"),
                "epoch": 3}, path)
    assert checkpoint_model(path).transform.min_size == (320,)
    torch.save(state, path)
    assert checkpoint_model(path, "fasterrcnn_mobilenet_v3_large_fpn").transform.min_size == (800,)


def _save(tmp_path, name, obj=None, raw: bytes | None = None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(obj, path)
    return path


def test_errors_are_one_sentence_each(states, tmp_path):
    good = _save(tmp_path, "good.pt", states["fasterrcnn_resnet50_fpn"])
    torch.manual_seed(0)
    whole = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    r101 = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet101", weights=None), num_classes=5)
    cases = {
        "missing": (tmp_path / "nope.pt", r"nope.pt does not exist; expected a state_dict"),
        "text": (_save(tmp_path, "labels.txt", raw=b"person\ncar\n"), r"is a text file, not a PyTorch checkpoint"),
        "damaged": (_save(tmp_path, "cut.pt", raw=good.read_bytes()[:50000]), r"is damaged or truncated"),
        "pickled model": (_save(tmp_path, "whole.pt", whole),
                          r"holds a pickled Python object \(a whole model\?\), not a state_dict.*"
                          r"torch.save\(model.state_dict\(\), path\)"),
        "not tensors": (_save(tmp_path, "list.pt", [1, 2]), r"holds a list that is not a state_dict of tensors"),
        "retinanet": (_save(tmp_path, "retina.pt", torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None).state_dict()), r"looks like a RetinaNet, FCOS or SSD"),
        "resnet101": (_save(tmp_path, "r101.pt", r101.state_dict()),
                      r"looks like a ResNet FPN Faster R-CNN \(ResNet-101 body.*exporters.api.export_model"),
        "wrong arch": (good, r"is not a fasterrcnn_resnet50_fpn_v2 state_dict: it has \d+ missing keys"),
    }
    for what, (path, message) in cases.items():
        arch = "fasterrcnn_resnet50_fpn_v2" if what == "wrong arch" else None
        with pytest.raises(CheckpointError, match=message) as info:
            checkpoint_model(path, arch)
        text = str(info.value)
        assert "\n" not in text and "Traceback" not in text and len(text) < 700, (what, text)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match=r"unknown --arch 'fasterrcnn_resnet18'; expected one of fasterrcnn_resnet50_fpn"):
        builders.build("fasterrcnn_resnet18")


def test_unsupported_modules_are_named():
    """A module the rpn's extent masks don't know is refused at export, by its path."""
    torch.manual_seed(0)
    model = builders.build("fasterrcnn_resnet50_fpn", num_classes=5)
    model.backbone.body.layer2[0].relu = torch.nn.GELU()  # a cell-wise op it does not list
    with pytest.raises(UnsupportedModel, match=r"backbone.body.layer2.0.relu is a torch.nn.modules.activation.GELU"
                                               r".*supported: Conv2d"):
        check_supported(model)
    model = builders.build("fasterrcnn_resnet50_fpn", num_classes=5)
    model.backbone.body.layer1[0].conv2.padding_mode = "reflect"
    with pytest.raises(UnsupportedModel, match=r"layer1.0.conv2 is a Conv2d with padding_mode='reflect'"):
        check_supported(model)
    mask = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    from exporters.structure import describe
    with pytest.raises(UnsupportedModel, match=r"MaskRCNN has a mask or keypoint head"):
        describe(mask)
