"""Tensor specs of every step: the one place the Triton configs and the TensorRT profiles take
names, dtypes and per-item dims from.

A low-level module (it imports only :mod:`python_backend` and Triton's config proto), so both
:mod:`exporters.repository` and :mod:`exporters.tensorrt.profiles` import it without importing
each other.
"""
from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from python_backend import names
from python_backend.settings import DetectorSettings

FP32, FP16, INT32, UINT8 = mc.TYPE_FP32, mc.TYPE_FP16, mc.TYPE_INT32, mc.TYPE_UINT8
# metadata of the rpn ONNX (``metadata_props``): the canvases it was exported for, "800x800,800x1088,..."
# (its height and width are dynamic, so the canvases can't be read from its input shapes)
CANVASES_KEY = "canvases"


def max_rois(settings: DetectorSettings, max_batch_size: int) -> int:
    """The header's batch limit: every RoI of a full batch of ``max_batch_size`` images."""
    return int(max_batch_size) * settings.rpn_post_nms_top_n


def io_spec(name: str, dtype: int, dims, **kw) -> dict:
    """One ``ModelInput``/``ModelOutput`` as keyword arguments of ``cfg.input.add(**spec)``."""
    return dict(name=name, data_type=dtype, dims=list(dims), **kw)


def maps_type(target: str, precision: str) -> int:
    """Triton dtype of the FPN maps from rpn to roi: TYPE_FP16 from the torch target's fp16 rpn
    (exporters/torch_export.py leaves them float16, which the roi step pools without a copy),
    else TYPE_FP32 (the ONNX networks' outputs, which the TensorRT engines keep)."""
    return FP16 if target == "torch" and precision == "fp16" else FP32


def tensor_specs(settings: DetectorSettings, maps: int = FP32) -> dict[str, tuple[list[dict], list[dict]]]:
    """``{step: (inputs, outputs)}`` of every step, without the batch axis, as the ONNX carries them.

    Height and width (-1) are the canvas's, one of ``settings.canvases`` per batch: the images
    ``[3, H, W]`` and the FPN maps ``[H/s, W/s, C]`` (channels last), of dtype ``maps``
    (:func:`maps_type`)."""
    c = settings.num_classes
    s = settings.roi_output_size
    ch = settings.fpn_channels
    _io = io_spec
    feats = [_io(n, maps, [-1, -1, ch]) for n in settings.feature_names]
    rpn_in = [_io(names.IMAGES, FP32, [3, -1, -1]), _io(names.IMAGE_SIZES, FP32, [2])]
    rpn_out = [_io(names.PROPOSALS, FP32, [settings.num_proposals, 6])] + feats
    header_in = [_io(names.ROI_FEATURES, FP32, [s, s, ch]), _io(names.ROIS, FP32, [4])]
    header_out = [_io(names.CLASS_SCORES, FP32, [c]), _io(names.CLASS_BOXES, FP32, [c, 4])]
    return {
        names.RPN: (rpn_in, rpn_out),
        names.HEADER: (header_in, header_out),
        # allow_ragged_batch: Triton's dynamic batcher joins only requests of equal shapes unless an
        # input allows ragged batches; the python backend hands preprocess each request's own
        # tensors, so images of any size (and encodings of any length) may share an execute
        names.PREPROCESS: ([_io(names.IMAGE_BYTES, UINT8, [-1], allow_ragged_batch=True)],
                           [rpn_in[0], rpn_in[1], _io(names.ORIGINAL_SIZES, FP32, [2])]),
        names.PREPROCESS_RAW: ([_io(names.IMAGE_RAW, UINT8, [-1, -1, 3], allow_ragged_batch=True)],
                               [rpn_in[0], rpn_in[1], _io(names.ORIGINAL_SIZES, FP32, [2])]),
        names.ROI: ([rpn_out[0], *feats, _io(names.IMAGE_SIZES, FP32, [2])],
                    [_io(names.ROIS, FP32, [4]), _io(names.ROI_FEATURES, FP32, [s, s, ch]),
                     _io(names.NUM_ROIS, INT32, [1])]),
        # non-batching: shapes carry their own leading axis
        names.POSTPROCESS: ([_io(names.CLASS_SCORES, FP32, [-1, c]), _io(names.CLASS_BOXES, FP32, [-1, c, 4]),
                             _io(names.NUM_ROIS, INT32, [-1, 1]), _io(names.IMAGE_SIZES, FP32, [-1, 2]),
                             _io(names.ORIGINAL_SIZES, FP32, [-1, 2])],
                            [_io(names.DETECTION_BOXES, FP32, [-1, settings.box_detections_per_img, 4]),
                             _io(names.DETECTION_SCORES, FP32, [-1, settings.box_detections_per_img]),
                             _io(names.DETECTION_LABELS, INT32, [-1, settings.box_detections_per_img]),
                             _io(names.NUM_DETECTIONS, INT32, [-1, 1])]),
    }
