"""Static proof that an ONNX graph is one TensorRT's parser takes whole.

TensorRT rejects (or can't build static shapes around) data-dependent control flow and
data-dependent shapes.  This check fails with the offending node's name and op.
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper, shape_inference

MIN_OPSET = 17
# TopK's K must be below 3840 for TensorRT's ONNX parser ("K input must be less than 3840",
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md); ITopKLayer::setK says
# "Currently only values up to 3840 are supported"
# (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_top_k_layer.html).
# The stricter of the two is kept.
TOPK_K_LIMIT = 3840  # K must be < this
# The size a dynamic input axis is bound to when looking for data-dependent shapes: any size
# does, what matters is whether every other shape follows from the inputs' shapes.
_PROBE_SIZE = 2

# Control flow, ops whose output shape depends on data, and the ops this design moves out
# of the networks (NMS, RoiAlign) on purpose.
BANNED_OPS = frozenset({
    "NonZero", "If", "Loop", "Scan", "NonMaxSuppression", "RoiAlign", "Unique", "Compress",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
})

# Inputs that must be graph constants, or the output shape would depend on data.
_SHAPE_INPUTS = {"TopK": (1,), "Range": (0, 1, 2), "OneHot": (1,)}


class NotTensorRTReady(ValueError):
    """The graph has something TensorRT can't take; the message names the node."""


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'!r} (op {node.op_type})"


def check_tensorrt_ready(model: onnx.ModelProto, dynamic_axis: int = 0) -> None:
    """Raise :class:`NotTensorRTReady` unless ``model``:

    * uses opset >= 17;
    * has none of :data:`BANNED_OPS` (subgraphs included);
    * takes TopK's K (and Range's bounds) from constants, so no shape depends on data, and
      K < :data:`TOPK_K_LIMIT`;
    * has every input and output dimension static, except the dynamic batch/RoI axis
      ``dynamic_axis``;
    * has every intermediate shape follow from the inputs' shapes: with the dynamic axes bound
      to a size, shape inference finds every intermediate dimension static.  A dimension still
      free then (``unk__12``, a NonZero-like output, a Slice to a computed end) depends on data.
    """
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise NotTensorRTReady(f"opset {opset} is older than the required {MIN_OPSET}")

    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            constants.update({o: value for o in node.output})

    def walk(g: onnx.GraphProto):
        for node in g.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    for node in walk(graph):
        if node.op_type in BANNED_OPS or node.domain not in ("", "ai.onnx"):
            raise NotTensorRTReady(f"{_node_label(node)} is not allowed in a TensorRT network")
        for i in _SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                raise NotTensorRTReady(
                    f"{_node_label(node)} takes input {i} ({node.input[i]!r}) from data, so its output shape is "
                    "data dependent"
                )
        if node.op_type == "TopK" and len(node.input) > 1 and constants.get(node.input[1]) is not None:
            k = int(numpy_helper.to_array(constants[node.input[1]]).reshape(-1)[0])
            if k >= TOPK_K_LIMIT:
                raise NotTensorRTReady(f"{_node_label(node)} has K={k}; TensorRT's TopK needs K < {TOPK_K_LIMIT} "
                                       "(lower the checkpoint's pre-NMS top-n)")

    dynamic = set()
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if not d.HasField("dim_value"):
                if axis != dynamic_axis:
                    raise NotTensorRTReady(f"input {value.name!r} has a dynamic dimension {axis}; "
                                           f"only axis {dynamic_axis} may be")
                dynamic.add(d.dim_param)
    for value in graph.output:
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise NotTensorRTReady(f"output {value.name!r} has no static rank")
        for axis, d in enumerate(dims):
            if not d.HasField("dim_value") and (axis != dynamic_axis or d.dim_param not in dynamic):
                raise NotTensorRTReady(
                    f"output {value.name!r} dimension {axis} is {d.dim_param or 'unknown'!r}: "
                    f"only axis {dynamic_axis} may be dynamic, and only as an input's {sorted(dynamic)}"
                )

    _check_shapes_follow_inputs(model)


def _check_shapes_follow_inputs(model: onnx.ModelProto) -> None:
    """Bind every dynamic axis to :data:`_PROBE_SIZE` and raise unless shape inference then
    finds every intermediate and output dimension static (see :func:`check_tensorrt_ready`)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    # outputs too: their dynamic axis is an input's (checked above), the same size
    for value in [*probe.graph.input, *probe.graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = _PROBE_SIZE  # dim_value and dim_param are one field: this clears the name
    del probe.graph.value_info[:]
    inferred = shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    producer = {o: n for n in inferred.graph.node for o in n.output}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        node = producer.get(value.name)
        where = _node_label(node) if node is not None else f"value {value.name!r}"
        t = value.type.tensor_type
        if not t.HasField("shape"):
            raise NotTensorRTReady(f"{where}: output {value.name!r} has unknown rank")
        free = [d.dim_param or "?" for d in t.shape.dim if not d.HasField("dim_value")]
        if free:
            raise NotTensorRTReady(f"{where}: output {value.name!r} has data-dependent dimensions {free} "
                                   "(they do not follow from the inputs' shapes)")
