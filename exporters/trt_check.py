"""Static proof that an ONNX graph is one TensorRT's parser takes whole.

TensorRT rejects (or can't build static shapes around) data-dependent control flow and
data-dependent shapes.  Dynamic axes are fine where they are declared inputs of the engine (its
optimization profiles give their ranges) and every other shape follows from them: a value computed
only from ``Shape`` ops and constants is a TensorRT shape tensor, which Reshape, Expand, Range,
Slice and the like may take.  This check fails with the offending node's name and op.
"""
from __future__ import annotations

from typing import Mapping

import onnx
from onnx import numpy_helper, shape_inference

MIN_OPSET = 17
# TopK's K must be below 3840 for TensorRT's ONNX parser ("K input must be less than 3840",
# https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md); ITopKLayer::setK says
# "Currently only values up to 3840 are supported"
# (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_top_k_layer.html).
# The stricter of the two is kept.
TOPK_K_LIMIT = 3840  # K must be < this
# The size a dynamic batch axis is bound to when looking for data-dependent shapes (without
# ``dynamic_axes``): any size does, what matters is whether every other shape follows from the
# inputs' shapes.
_PROBE_SIZE = 2

# Control flow, ops whose output shape depends on data, and the ops this design moves out
# of the networks (NMS, RoiAlign) on purpose.
BANNED_OPS = frozenset({
    "NonZero", "If", "Loop", "Scan", "NonMaxSuppression", "RoiAlign", "Unique", "Compress",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
})

# Inputs that set an output's shape: TensorRT reads them as shape tensors, so they must be computed
# from shapes and constants, never from the data flowing through the network.
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Range": (0, 1, 2), "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4), "Resize": (2, 3), "Pad": (1, 3), "OneHot": (1,), "Split": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,),
}
# Inputs that must be constants outright: TopK's K (TensorRT's ITopKLayer takes a build-time K)
CONSTANT_INPUTS = {"TopK": (1,)}
# Ops whose output is a shape however their input was computed
_SHAPE_OPS = frozenset({"Shape", "Size"})


class NotTensorRTReady(ValueError):
    """The graph has something TensorRT can't take; the message names the node."""


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'!r} (op {node.op_type})"


def check_tensorrt_ready(model: onnx.ModelProto, dynamic_axes: Mapping[str, int] | None = None) -> None:
    """Raise :class:`NotTensorRTReady` unless ``model``:

    * uses opset >= 17;
    * has none of :data:`BANNED_OPS` (subgraphs included);
    * takes TopK's K from a constant, K < :data:`TOPK_K_LIMIT`;
    * takes every shape input (:data:`SHAPE_INPUTS`: Reshape's shape, Range's bounds, ...) from
      values computed only from ``Shape``/``Size`` ops and constants, never from data;
    * has a dynamic input dimension only where declared: ``dynamic_axes`` maps each declared axis's
      name (the ONNX ``dim_param``: "batch", "height", ...) to a size to bind it to for the check;
      without it, only axis 0 of each input (the batch) may be dynamic;
    * has every output of static rank, and every intermediate and output dimension follow from the
      inputs' shapes: with the dynamic axes bound to their sizes and every shape computation folded
      (onnxsim), shape inference finds every dimension static.  A dimension still free then
      (``unk__12``, a NonZero-like output) depends on data.
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

    sizes = _declared_sizes(graph, dynamic_axes)
    for value in graph.output:
        if not value.type.tensor_type.shape.dim:
            raise NotTensorRTReady(f"output {value.name!r} has no static rank")
    _check_shape_inputs(graph, constants)
    _check_shapes_follow_inputs(model, sizes)


def _declared_sizes(graph: onnx.GraphProto, dynamic_axes: Mapping[str, int] | None) -> dict[str, list[int]]:
    """``{input: shape}`` with every dynamic dimension bound to its declared size; raises for a
    dynamic dimension that is not declared."""
    shapes = {}
    for value in graph.input:
        shape = []
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif dynamic_axes is None and axis == 0:
                shape.append(_PROBE_SIZE)
            elif dynamic_axes is not None and d.dim_param in dynamic_axes:
                shape.append(int(dynamic_axes[d.dim_param]))
            else:
                declared = sorted(dynamic_axes) if dynamic_axes is not None else ["axis 0 (the batch)"]
                raise NotTensorRTReady(f"input {value.name!r} has a dynamic dimension {axis} "
                                       f"({d.dim_param or 'unnamed'!r}), which is not a declared dynamic axis "
                                       f"(declared: {', '.join(declared)})")
        shapes[value.name] = shape
    return shapes


def _check_shape_inputs(graph: onnx.GraphProto, constants: Mapping) -> None:
    """Shape inputs computed only from shapes and constants, TopK's K a constant (see
    :func:`check_tensorrt_ready`).  ONNX graphs are topologically sorted, so one pass finds every
    value computed from ``Shape``/``Size`` outputs and constants alone."""
    from_shapes = set(constants)
    for node in graph.node:
        inputs = [i for i in node.input if i]
        for i in CONSTANT_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                source = "a computation" if node.input[i] in from_shapes else "data"
                raise NotTensorRTReady(f"{_node_label(node)} takes input {i} ({node.input[i]!r}) from {source}; "
                                       "TensorRT needs a constant there (else its output shape is data dependent)")
        for i in SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in from_shapes:
                raise NotTensorRTReady(f"{_node_label(node)} takes input {i} ({node.input[i]!r}) from data, so its "
                                       "output shape is data dependent")
        if node.op_type == "TopK" and len(node.input) > 1 and constants.get(node.input[1]) is not None:
            k = int(numpy_helper.to_array(constants[node.input[1]]).reshape(-1)[0])
            if k >= TOPK_K_LIMIT:
                raise NotTensorRTReady(f"{_node_label(node)} has K={k}; TensorRT's TopK needs K < {TOPK_K_LIMIT} "
                                       "(lower the checkpoint's pre-NMS top-n)")
        if node.op_type in _SHAPE_OPS or (inputs and all(i in from_shapes for i in inputs)):
            from_shapes.update(node.output)


def _check_shapes_follow_inputs(model: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> None:
    """Bind the inputs to ``shapes``, fold every shape computation (onnxsim: ``Shape`` of a static
    tensor becomes a constant, and so does everything computed from it), and raise unless shape
    inference then finds every intermediate and output dimension static (see
    :func:`check_tensorrt_ready`)."""
    import onnxsim

    try:
        probe, _ = onnxsim.simplify(model, perform_optimization=False, overwrite_input_shapes=dict(shapes))
    except Exception as e:  # noqa: BLE001  onnxsim raises several types for a graph it can't infer
        raise NotTensorRTReady(f"shape inference failed with the inputs bound to {dict(shapes)}: {e}") from None
    for value in probe.graph.output:  # inferred again below, from the bound inputs
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
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
