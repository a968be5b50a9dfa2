"""Export the split networks to ONNX, simplify them and check they are TensorRT-ready."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import onnx
import torch

from python_backend import names
from python_backend.settings import DetectorSettings, format_canvases

from .specs import CANVASES_KEY
from .split import HeaderNetwork, RpnNetwork
from .trt_check import check_tensorrt_ready

log = logging.getLogger(__name__)

OPSET = 17
BATCH = "batch"
HEIGHT, WIDTH = "height", "width"  # of the rpn's images: the canvas
NUM_ROIS = "num_rois"


def _export(module: torch.nn.Module, args: tuple, input_names, output_names, dynamic_axes) -> onnx.ModelProto:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, args, buf, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim, then an onnx-graphsurgeon pass that folds constants, drops dead nodes and sorts."""
    import onnx_graphsurgeon as gs
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    graph = gs.import_onnx(simplified)
    graph.fold_constants().cleanup().toposort()
    out = gs.export_onnx(graph)
    out.opset_import[0].version = max(out.opset_import[0].version, OPSET)
    return out


def export_rpn(model, settings: DetectorSettings, batch: int = 2) -> onnx.ModelProto:
    """``images [B,3,H,W], image_sizes [B,2] -> proposals [B,K,6], pooled maps [B,H/s,W/s,C]``
    (``settings.feature_names``, strides ``settings.roi_strides``).

    B, H and W are dynamic: one network serves every canvas (:class:`~exporters.split.RpnNetwork`
    has no canvas of its own; K is the same constant on each).  It is traced on the smallest of the
    settings' canvases, and the canvases go into the model's metadata (:data:`exporters.specs.CANVASES_KEY`)."""
    net = RpnNetwork(model, settings).eval()
    h, w = settings.canvases[0]
    images = torch.zeros(batch, 3, h, w)
    sizes = torch.tensor([[h, w]] * batch, dtype=torch.float32)
    outputs = (names.PROPOSALS, *settings.feature_names)
    axes = {names.IMAGES: {0: BATCH, 2: HEIGHT, 3: WIDTH}, names.IMAGE_SIZES: {0: BATCH}, names.PROPOSALS: {0: BATCH}}
    for name, stride in zip(settings.feature_names, settings.roi_strides):
        axes[name] = {0: BATCH, 1: f"{HEIGHT}_{stride}", 2: f"{WIDTH}_{stride}"}  # height / stride
    onnx_model = simplify(_export(net, (images, sizes), (names.IMAGES, names.IMAGE_SIZES), outputs, axes))
    onnx.helper.set_model_props(onnx_model, {CANVASES_KEY: format_canvases(settings.canvases)})
    return onnx_model


def rpn_dynamic_axes(settings: DetectorSettings, batch: int = 2) -> dict[str, int]:
    """The rpn's declared dynamic axes, each with a size to check it at (the smallest canvas)."""
    h, w = settings.canvases[0]
    return {BATCH: batch, HEIGHT: h, WIDTH: w}


def export_header(model, settings: DetectorSettings, rois: int = 8) -> onnx.ModelProto:
    """``roi_features [R,7,7,C], rois [R,4] -> class_scores [R,C], class_boxes [R,C,4]``; R dynamic."""
    net = HeaderNetwork(model).eval()
    s = settings.roi_output_size
    feats = torch.zeros(rois, s, s, settings.fpn_channels)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * rois)
    outputs = (names.CLASS_SCORES, names.CLASS_BOXES)
    axes = {n: {0: NUM_ROIS} for n in (names.ROI_FEATURES, names.ROIS, *outputs)}
    onnx_model = _export(net, (feats, boxes), (names.ROI_FEATURES, names.ROIS), outputs, axes)
    return simplify(onnx_model)


def export_all(model, settings: DetectorSettings, out_dir: Path) -> dict[str, Path]:
    """Write ``rpn.onnx`` and ``header.onnx`` into ``out_dir`` after the TensorRT-readiness check."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    dynamic = {names.RPN: rpn_dynamic_axes(settings), names.HEADER: {NUM_ROIS: 8}}
    for name, fn in ((names.RPN, export_rpn), (names.HEADER, export_header)):
        log.info("exporting %s to ONNX (opset %d)", name, OPSET)
        m = fn(model, settings)
        check_tensorrt_ready(m, dynamic[name])
        path = out_dir / f"{name}.onnx"
        onnx.save(m, str(path))
        paths[name] = path
    return paths
