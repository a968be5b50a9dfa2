"""Which layers of an fp16 engine stay fp32: a pure policy over plain layer records.

TensorRT's builder is free to run any layer in fp16 once ``BuilderFlag.FP16`` is set; layers
given a precision and output type, with ``OBEY_PRECISION_CONSTRAINTS``, keep it
(:func:`exporters.tensorrt.build.constrain_fp32` applies the :class:`Fp32Constraints` made
here).  The policy sees each layer only as a :class:`LayerInfo` (kind, operation, input and
output tensor names), so it is tested on graphs built by hand, shaped the way TensorRT's ONNX
parser builds them (``tests/test_trt_precision.py``), without TensorRT.

What fp16 loses, and so what stays fp32:

* **Range and ranking**: exp overflows fp16's largest value (65504) above about 11, and so
  does the softmax built on it; the rpn ranks anchors by objectness (TopK over logits, then
  Sigmoid), where fp16 rounding turns near-ties into reorderings.  These layers
  (:data:`FP32_ALWAYS`) stay fp32 wherever they are (TopK in its own way, below).
* **Pixel coordinates**: fp16 has a 1-pixel step above 1024 and 0.5 above 512, so box decoding
  and clipping run in fp32.  After the last Conv/MatMul, every arithmetic layer is decode
  math (:data:`ARITHMETIC_KINDS` with no dense layer downstream), and every data-moving layer
  (:data:`DATA_MOVING_KINDS`: reshapes, gathers, slices, concatenations, casts; constants are
  reached too, but never constrained, see below) joined to that math through other data movers
  stays fp32 too, upstream (anchors, image sizes and deltas on their way in) and downstream
  (boxes on their way to the outputs): a reshape left to the builder could otherwise round
  coordinates to fp16 between two fp32 layers.

What stays fp16, on purpose:

* **Bias adds**: TensorRT's ONNX parser turns a Gemm's (or a MatMul + Add's) rank-1 bias into
  ``CONSTANT -> SHUFFLE (broadcast to the matmul's rank) -> ELEMENTWISE SUM``
  (onnx-tensorrt ``onnxOpImporters.cpp`` Gemm, ``importerUtils.cpp`` broadcastTensor,
  https://github.com/onnx/onnx-tensorrt).  Such a sum belongs to its dense layer: TensorRT fuses
  it into the GEMM's epilogue, and it is treated as part of that layer, not as decode math.
* **Residual and FPN adds** (two activations summed in the backbone): their operands are
  convolution outputs that the builder already computes and stores in fp16, so pinning the sum
  alone cannot keep values in range, and it would split each convolution from the add that
  TensorRT fuses into it ("Convolution and ElementWise Operation" in TensorRT's layer fusion
  catalog, https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/fusion-catalog.html).
  Whether fp16 keeps the detector's accuracy is measured end to end (the fp16 criterion in
  the evaluation package), not guessed per layer.

Which layers can take a constraint at all.  Under ``OBEY_PRECISION_CONSTRAINTS`` TensorRT fails
the build when a constraint can't be obeyed (``ILayer::setPrecision`` and ``setOutputType`` in
``include/NvInfer.h``, https://github.com/NVIDIA/TensorRT), so a layer gets a precision and fp32
output types only when every output is a float activation (:func:`constrainable`), the rule of
Polygraphy's precision tool (``tools/Polygraphy/polygraphy/tools/debug/subtool/precision.py``,
``mark_layers``: it skips CONSTANT layers and any layer with an output that is not an execution
tensor or not float/int8):

* **CONSTANT** layers are never constrained.  A constant's values are stored as the network
  defines them (fp32 here); the fp32 layers that read it (the anchors' GATHER, a decode
  constant's broadcast SHUFFLE) are pinned, so nothing asks for an fp16 copy.
* **Shape layers**: SHAPE, and any layer with a shape-tensor output (``ITensor.is_shape_tensor``,
  or not ``is_execution_tensor``: sizes, TopK's k, Resize scales) are never constrained;
  NvInfer.h: "the output type of all layers that are shape operations must be DataType::kINT32".
* **Layers with a non-float output** (comparisons, indices) are never constrained, TopK included:
  its second output holds int32 indices.

TopK's ranking is kept in fp32 without a layer precision: the layer feeding its data input is
pinned, whatever its kind (in the rpn it is the masking SELECT after the logits' reshape), and
only TopK's values output gets the fp32 output type (:data:`OUTPUT_TYPE_ONLY`; NvInfer.h
``setOutputType``: it "cannot be used to set the data type of the second output tensor of the
TopK layer", which leaves the first settable).  With fp32 in and fp32 out, TensorRT has no fp16
TopK to choose.  The logits convolution before the reshape stays fp16, like the other dense
layers: the end-to-end fp16 criterion judges its rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LayerInfo:
    """What the policy needs to know about one network layer (TensorRT's network order)."""

    name: str
    kind: str  # trt.LayerType name: "CONVOLUTION", "ELEMENTWISE", ...
    op: str | None  # ElementWiseOperation / UnaryOperation / ActivationType name, else None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: tuple[int, ...]  # indices of outputs whose dtype is FLOAT or HALF
    shape_outputs: tuple[int, ...] = ()  # indices of outputs that are shape tensors (not plain activations)


@dataclass(frozen=True)
class Fp32Constraints:
    """What :func:`exporters.tensorrt.build.constrain_fp32` sets, by layer name (network order)."""

    layers: tuple[str, ...]  # precision fp32 and every output's type fp32
    outputs: dict[str, tuple[int, ...]]  # only these outputs' types fp32 (layers that take no precision)


# (kind, operation): kept in fp32 wherever they are (range and ranking, see the module docstring)
FP32_ALWAYS = frozenset({("SOFTMAX", None), ("TOPK", None), ("UNARY", "EXP"), ("ACTIVATION", "SIGMOID")})
DENSE_KINDS = frozenset({"CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY", "FULLY_CONNECTED"})
ARITHMETIC_KINDS = frozenset({"ELEMENTWISE", "UNARY", "ACTIVATION", "SOFTMAX", "TOPK", "REDUCE", "SCALE"})
# Layers that copy, reorder, select or convert values without computing new ones.  CONSTANT is
# here so that the walk reaches constants; :func:`constrainable` then leaves them out.
DATA_MOVING_KINDS = frozenset({"CONSTANT", "SHUFFLE", "GATHER", "SLICE", "CONCATENATION", "CAST", "IDENTITY",
                               "SELECT", "SCATTER", "PADDING", "FILL", "SQUEEZE", "UNSQUEEZE"})
# Layers never constrained, whatever their outputs (see "Which layers can take a constraint")
NEVER_CONSTRAINED_KINDS = frozenset({"CONSTANT", "SHAPE"})
# Layers kept fp32 that take no precision: the outputs whose type alone is set (TopK's values)
OUTPUT_TYPE_ONLY = {"TOPK": (0,)}
# Data movers a constant passes through on its way to a bias add (the parser's broadcast SHUFFLE)
_CONSTANT_PASSTHROUGH = frozenset({"SHUFFLE", "CAST", "IDENTITY"})


class _Graph:
    """Producers and consumers of every tensor of a layer list."""

    def __init__(self, layers: Sequence[LayerInfo]):
        self.layers = list(layers)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for idx, layer in enumerate(self.layers):
            for t in layer.inputs:
                self.consumers.setdefault(t, []).append(idx)
            for t in layer.outputs:
                self.producer[t] = idx

    def produced_by(self, tensor: str) -> LayerInfo | None:
        idx = self.producer.get(tensor)
        return None if idx is None else self.layers[idx]

    def is_constant(self, tensor: str) -> bool:
        """The tensor is a CONSTANT's output, directly or through broadcast/cast layers."""
        layer = self.produced_by(tensor)
        while layer is not None and layer.kind in _CONSTANT_PASSTHROUGH and layer.inputs:
            layer = self.produced_by(layer.inputs[0])  # input 0 is the data; a SHUFFLE's 1 is a shape
        return layer is not None and layer.kind == "CONSTANT"

    def is_bias_add(self, layer: LayerInfo) -> bool:
        """``dense output + constant``: the parser's bias add of a Gemm or MatMul."""
        if (layer.kind, layer.op) != ("ELEMENTWISE", "SUM") or len(layer.inputs) != 2:
            return False
        a, b = (self.produced_by(t) for t in layer.inputs)
        return any(p is not None and p.kind in DENSE_KINDS and self.is_constant(other)
                   for p, other in ((a, layer.inputs[1]), (b, layer.inputs[0])))


def constrainable(layer: LayerInfo) -> bool:
    """Whether ``layer`` may take a precision and output types: not CONSTANT or SHAPE, every output
    a float activation (no integer, boolean or shape-tensor output)."""
    return (layer.kind not in NEVER_CONSTRAINED_KINDS and bool(layer.outputs)
            and len(layer.float_outputs) == len(layer.outputs) and not layer.shape_outputs)


def select_fp32_layers(layers: Sequence[LayerInfo]) -> list[str]:
    """Names of the layers to pin to fp32 (precision and output types), in network order."""
    return list(fp32_constraints(layers).layers)


def fp32_constraints(layers: Sequence[LayerInfo]) -> Fp32Constraints:
    """The layers to pin to fp32 and the outputs to type fp32 (the rules are the module docstring's).

    ``layers`` must be in topological order, as ``INetworkDefinition.get_layer`` returns them.
    """
    g = _Graph(layers)
    n = len(g.layers)
    dense = [layer.kind in DENSE_KINDS or g.is_bias_add(layer) for layer in g.layers]
    # feeds_dense[i]: a dense layer is reachable downstream of layer i; one reverse sweep settles it
    feeds_dense = [False] * n
    for idx in range(n - 1, -1, -1):
        feeds_dense[idx] = any(dense[c] or feeds_dense[c]
                               for t in g.layers[idx].outputs for c in g.consumers.get(t, ()))

    def floating(i: int) -> bool:  # a float activation among its outputs (shape tensors carry sizes)
        return bool(set(g.layers[i].float_outputs) - set(g.layers[i].shape_outputs))

    def in_tail(i: int) -> bool:
        return not dense[i] and not feeds_dense[i]

    keep = [floating(i) and ((g.layers[i].kind, g.layers[i].op) in FP32_ALWAYS
                             or (g.layers[i].kind in ARITHMETIC_KINDS and in_tail(i)))
            for i in range(n)]
    # TopK's data input is produced in fp32, whatever its producer (see the module docstring)
    for layer in g.layers:
        if layer.kind == "TOPK" and layer.inputs:
            feeder = g.producer.get(layer.inputs[0])
            if feeder is not None and floating(feeder):
                keep[feeder] = True
    movers = [floating(i) and g.layers[i].kind in DATA_MOVING_KINDS and in_tail(i) for i in range(n)]
    # data movers joined to fp32 math through other data movers: downstream (a forward sweep)...
    downstream = [False] * n
    for idx in range(n):
        if movers[idx]:
            producers = (g.producer.get(t) for t in g.layers[idx].inputs)
            downstream[idx] = any(p is not None and (keep[p] or downstream[p]) for p in producers)
    # ... and upstream (a reverse sweep)
    upstream = [False] * n
    for idx in range(n - 1, -1, -1):
        if movers[idx]:
            upstream[idx] = any(keep[c] or upstream[c]
                                for t in g.layers[idx].outputs for c in g.consumers.get(t, ()))
    wanted = [g.layers[i] for i in range(n) if keep[i] or downstream[i] or upstream[i]]
    outputs = {}
    for layer in wanted:
        typed = tuple(j for j in OUTPUT_TYPE_ONLY.get(layer.kind, ())
                      if j in layer.float_outputs and j not in layer.shape_outputs)
        if not constrainable(layer) and typed:
            outputs[layer.name] = typed
    return Fp32Constraints(tuple(layer.name for layer in wanted if constrainable(layer)), outputs)
