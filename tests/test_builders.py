"""Every torchvision Faster R-CNN builder, and custom FasterRCNN models, through the ONNX Runtime
pipeline without Triton (as tests/test_alignment.py does for fasterrcnn_resnet50_fpn): the
structure read from the model, the TensorRT-readiness check on each exported ONNX (export_all
runs it), and detections equal to ``model.eval()([image])`` on photographs, alone and batched,
through ONNX Runtime and through a real tritonserver (the python target on the CPU) in every
orientation.

Seeded random weights at small resize sizes keep it fast: what these tests are about is
structure (strides, pooled maps, anchors, heads, global pools), which the sizes don't change.
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone

from evaluation.onnx_pipeline import OnnxPipeline
from evaluation.parity import assert_parity, torchvision_detect
from exporters import loading
from exporters.api import load_model_object
from exporters.onnx_export import export_all

PHOTOS = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "rocket")}
SMALL = dict(min_size=256, max_size=320)


def custom_model(seed: int = 0, backbone_name: str = "resnet18", returned_layers=None, dilated: bool = False,
                 **kw) -> FasterRCNN:
    """FasterRCNN(resnet_fpn_backbone(...)) with seeded random weights and calibrated norms;
    ``dilated``: resnet50 with a dilated last stage (BasicBlock resnets can't dilate), through the
    extractor resnet_fpn_backbone itself uses."""
    torch.manual_seed(seed)
    if dilated:
        body = resnet.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
        backbone = _resnet_fpn_extractor(body, 5, returned_layers=returned_layers)
    else:
        backbone = resnet_fpn_backbone(backbone_name=backbone_name, weights=None, trainable_layers=5,
                                       norm_layer=torch.nn.BatchNorm2d, returned_layers=returned_layers)
    model = FasterRCNN(backbone, num_classes=kw.pop("num_classes", 5), **{**SMALL, **kw})
    loading.calibrate_norms(model, seed)
    return model.eval()


def _anchors(levels: int, sizes=((24, 48), (64, 96), (128, 192), (256, 384), (512, 640)), ratios=(0.5, 1.0, 2.0, 3.0)):
    return AnchorGenerator(sizes[:levels], (ratios,) * levels)


MODELS = {
    # name: (builder, expected rpn strides, expected pooled strides)
    # 300 proposals, not 1000: its box head (four 3x3 convolutions on every RoI) is most of its time on a CPU
    "fasterrcnn_resnet50_fpn_v2": (lambda: loading.random_model(91, arch="fasterrcnn_resnet50_fpn_v2", **SMALL,
                                                                rpn_pre_nms_top_n_test=300,
                                                                rpn_post_nms_top_n_test=300),
                                   (4, 8, 16, 32, 64), (4, 8, 16, 32)),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        lambda: loading.random_model(91, arch="fasterrcnn_mobilenet_v3_large_fpn", **SMALL), (32, 32, 64), (32, 32)),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (  # its own 320/640 resize and RPN top-n 150
        lambda: loading.random_model(91, arch="fasterrcnn_mobilenet_v3_large_320_fpn"), (32, 32, 64), (32, 32)),
    "resnet18_layers_2_3_4_anchors": (
        lambda: custom_model(returned_layers=[2, 3, 4], rpn_anchor_generator=_anchors(4)), (8, 16, 32, 64), (8, 16, 32)),
    "resnet50_dilated_layer4_224_288": (
        lambda: custom_model(dilated=True, min_size=224, max_size=288), (4, 8, 16, 16, 32), (4, 8, 16, 16)),
}


# Its random calibrated backbone's maps reach ~280, where float32 rounding (1e-3, 4e-6 relative, the
# same size with and without folded norms) reorders near-tied proposals of coffee: 96/100 matched.
NEAR_TIES = pytest.mark.xfail(reason="rounding-level map differences reorder near-tied random-weight "
                                     "proposals (96/100 on coffee)", strict=False)


@pytest.fixture(scope="module", params=[pytest.param(n, marks=NEAR_TIES) if n.endswith("320_fpn") else n
                                        for n in MODELS])
def served(request, tmp_path_factory):
    """(name, model, settings, pipeline) of one builder or custom model, exported to ONNX."""
    build, rpn_strides, roi_strides = MODELS[request.param]
    model, settings = load_model_object(build())
    assert settings.rpn_strides == rpn_strides and settings.roi_strides == roi_strides
    paths = export_all(model, settings, tmp_path_factory.mktemp(request.param))  # TensorRT-readiness checked
    return request.param, model, settings, OnnxPipeline(paths["rpn"], paths["header"], settings), paths


_REFERENCES: dict[tuple[str, str], object] = {}


def _reference(served, label: str, image: np.ndarray):
    """torchvision's detections of ``image`` (named ``label``) by the served model, computed once
    per model (the tests below share photographs)."""
    name, model = served[:2]
    if (name, label) not in _REFERENCES:
        _REFERENCES[name, label] = torchvision_detect(model, image)
    return _REFERENCES[name, label]


def test_alone_and_batched_match_torchvision(served):
    name, model, settings, pipeline, _ = served
    refs = {n: _reference(served, f"{n} 0", img) for n, img in PHOTOS.items()}
    found = {n: r for n, r in refs.items() if len(r.scores) >= 10}
    assert len(found) >= 2, f"{name}: torchvision found too few detections to compare ({[len(r.scores) for r in refs.values()]})"
    for n in found:
        (ours,) = pipeline([PHOTOS[n]])
        assert_parity(refs[n], ours, f"{name}: {n} alone")
    batch = list(found)
    for n, ours in zip(batch, pipeline([PHOTOS[n] for n in batch])):
        assert_parity(refs[n], ours, f"{name}: {n} in a batch of {len(batch)}")


def test_settings_record_the_structure():
    """What the settings carry is read from the model, and survives config.pbtxt parameters."""
    from python_backend.settings import DetectorSettings

    model = loading.random_model(91, arch="fasterrcnn_mobilenet_v3_large_320_fpn")
    _, s = load_model_object(model)
    assert (s.min_size, s.max_size, s.rpn_pre_nms_top_n, s.rpn_post_nms_top_n) == (320, 640, 150, 150)
    assert s.rpn_score_thresh == pytest.approx(0.05) and s.rpn_anchors_per_cell == 15
    assert s.rpn_anchor_sizes == ((32.0, 64.0, 128.0, 256.0, 512.0),) * 3
    assert s.feature_names == ("features_0", "features_1") and s.level_range == (5, 5)
    assert DetectorSettings.from_parameters(s.to_parameters()) == s
    v2 = loading.random_model(5, arch="fasterrcnn_resnet50_fpn_v2", **SMALL)
    _, s2 = load_model_object(v2)
    assert (s2.box_head, s2.rpn_head_convs) == ("FastRCNNConvFCHead", 2)


def test_global_pool_averages_over_the_image_only():
    """MobileNetV3's SqueezeExcitation: an image's maps don't depend on the canvas it is padded onto."""
    from exporters.split import RpnNetwork

    model, settings = load_model_object(loading.random_model(91, arch="fasterrcnn_mobilenet_v3_large_fpn", **SMALL))
    net = RpnNetwork(model, settings, fold_norms=False).eval()
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(1, 3, 192, 224)).astype(np.float32))
    outs = []
    for canvas in ((256, 256), (256, 320)):
        x = torch.from_numpy(rng.normal(size=(1, 3) + canvas).astype(np.float32) * 5)  # garbage beyond the image
        x[:, :, :192, :224] = image
        with torch.no_grad():
            outs.append(net(x, torch.tensor([[192.0, 224.0]])))
    for a, b in zip(outs[0][1:], outs[1][1:]):
        np.testing.assert_allclose(a[:, :6, :7].numpy(), b[:, :6, :7].numpy(), rtol=0, atol=1e-4)


def _served_detections(client, images: list[np.ndarray]):
    """One request to ``fasterrcnn_raw`` of ``images`` (one size): each image's detections."""
    import tritonclient.grpc as grpcclient

    from evaluation.parity import from_packed
    from python_backend import names

    batch = np.stack(images)
    inp = grpcclient.InferInput(names.IMAGE_RAW, list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    res = client.infer(names.ENSEMBLE_RAW, [inp], client_timeout=300)
    out = [res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS,
                                      names.NUM_DETECTIONS)]
    return [from_packed(*(o[i] for o in out)) for i in range(len(images))]


# MobileNetV3-Large FPN at 256/320 (seeded random weights): its FPN maps equal torchvision's to 4e-6
# relative (1e-3 of maps reaching 250; the canvas differs from torchvision's batch, so convolutions
# round differently), which reorders near-tied proposals of coffee turned 90 degrees: 97/100 matched
NEAR_TIES_TURNED = pytest.mark.xfail(reason="rounding-level map differences reorder near-tied random-weight "
                                            "proposals (97/100 on coffee turned 90 degrees)", strict=False)


@pytest.mark.triton
def test_the_cpu_server_matches_torchvision_in_every_orientation(served, tmp_path, request):
    """Each builder and custom model through a real tritonserver: a landscape photograph as taken
    and turned by 90, 180 and 270 degrees and a square one (landscape, portrait and square
    canvases), each alone and those of one size together in one request."""
    import tritonclient.grpc as grpcclient

    from exporters.repository import RepositoryOptions, write_repository
    from fasterrcnn.server import TritonServer, free_port

    name, model, settings, _, paths = served
    if name == "fasterrcnn_mobilenet_v3_large_fpn":
        request.applymarker(NEAR_TIES_TURNED)
    turned = {f"{n} {90 * k}": np.ascontiguousarray(np.rot90(PHOTOS[n], k))
              for n, turns in (("coffee", 4), ("astronaut", 1)) for k in range(turns)}
    refs = {n: _reference(served, n, img) for n, img in turned.items()}
    found = [n for n, r in refs.items() if len(r.scores) >= 10]
    assert len(found) >= 3, f"{name}: torchvision found too few detections ({[len(r.scores) for r in refs.values()]})"
    repo = write_repository(tmp_path / "repo", settings, paths, RepositoryOptions(max_batch_size=4), link=True)
    with TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for n in found:
            (ours,) = _served_detections(client, [turned[n]])
            assert_parity(refs[n], ours, f"{name}: {n} degrees alone")
        by_shape: dict[tuple, list[str]] = {}
        for n in found:
            by_shape.setdefault(turned[n].shape, []).append(n)
        pairs = [group for group in by_shape.values() if len(group) > 1]
        assert pairs, f"{name}: no two images of one size to batch"
        for group in pairs:
            for n, ours in zip(group, _served_detections(client, [turned[n] for n in group])):
                assert_parity(refs[n], ours, f"{name}: {n} degrees in a request of {len(group)}")
