"""Static proof that an ONNX graph is one TensorRT's parser takes whole.

TensorRT rejects (or can't build static shapes around) data-dependent control flow and
data-dependent shapes.  This check fails with the offending node's name and op.
"""
from __future__ import annotations

import onnx
from onnx import shape_inference

MIN_OPSET = 17

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
    * takes TopK's K (and Range's bounds) from constants, so no shape depends on data;
    * has every input, output and inferred intermediate dimension static, except the
      dynamic batch/RoI axis ``dynamic_axis`` of tensors that carry it.
    """
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise NotTensorRTReady(f"opset {opset} is older than the required {MIN_OPSET}")

    graph = model.graph
    constants = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)

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
                    f"{_node_label(node)} takes input {i} ({node.input[i]!r}) from data, so its output shape is data dependent"
                )

    dynamic = set()
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if not d.HasField("dim_value"):
                if axis != dynamic_axis:
                    raise NotTensorRTReady(f"input {value.name!r} has a dynamic dimension {axis}; only axis {dynamic_axis} may be")
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

    inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    producer = {o: n for n in inferred.graph.node for o in n.output}
    for value in inferred.graph.value_info:
        t = value.type.tensor_type
        if not t.HasField("shape"):
            raise NotTensorRTReady(f"{_node_label(producer[value.name])}: output {value.name!r} has unknown rank")
        free = [d.dim_param or "?" for d in t.shape.dim if not d.HasField("dim_value") and d.dim_param not in dynamic]
        if len(free) > 1 or (free and free[0] == "?"):
            node = producer.get(value.name)
            where = _node_label(node) if node is not None else f"value {value.name!r}"
            raise NotTensorRTReady(f"{where}: output {value.name!r} has data-dependent dimensions {free}")
