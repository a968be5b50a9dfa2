"""Which layers of an fp16 engine stay fp32: a pure policy over plain layer records.

TensorRT's builder is free to run any layer in fp16 once ``BuilderFlag.FP16`` is set; layers
given a precision and output type, with ``OBEY_PRECISION_CONSTRAINTS``, keep it
(:func:`exporters.tensorrt.build.constrain_fp32` applies the list made here).  The policy sees
each layer only as a :class:`LayerInfo` (kind, operation, input and output tensor names), so
it is tested on graphs built by hand, shaped the way TensorRT's ONNX parser builds them
(``tests/test_tensorrt.py``), without TensorRT.

What fp16 loses, and so what stays fp32:

* **Range and ranking**: exp overflows fp16's largest value (65504) above about 11, and so
  does the softmax built on it; the rpn ranks anchors by objectness (TopK over logits, then
  Sigmoid), where fp16 rounding turns near-ties into reorderings.  These layers
  (:data:`FP32_ALWAYS`) stay fp32 wherever they are.
* **Pixel coordinates**: fp16 has a 1-pixel step above 1024 and 0.5 above 512, so box decoding
  and clipping run in fp32.  After the last Conv/MatMul, every arithmetic layer is decode
  math (:data:`ARITHMETIC_KINDS` with no dense layer downstream), and every data-moving layer
  (:data:`DATA_MOVING_KINDS`: reshapes, gathers, slices, concatenations, casts, constants)
  joined to that math through other data movers stays fp32 too, upstream (anchors, image
  sizes and deltas on their way in) and downstream (boxes on their way to the outputs): a
  reshape left to the builder could otherwise round coordinates to fp16 between two fp32
  layers.

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

Layers without a float output (shape arithmetic, masks, indices) are never constrained.
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


# (kind, operation): kept in fp32 wherever they are (range and ranking, see the module docstring)
FP32_ALWAYS = frozenset({("SOFTMAX", None), ("TOPK", None), ("UNARY", "EXP"), ("ACTIVATION", "SIGMOID")})
DENSE_KINDS = frozenset({"CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY", "FULLY_CONNECTED"})
ARITHMETIC_KINDS = frozenset({"ELEMENTWISE", "UNARY", "ACTIVATION", "SOFTMAX", "TOPK", "REDUCE", "SCALE"})
# Layers that copy, reorder, select or convert values without computing new ones.  CONSTANT is
# here because a constant's stored type is the first place anchors could be rounded.
DATA_MOVING_KINDS = frozenset({"CONSTANT", "SHUFFLE", "GATHER", "SLICE", "CONCATENATION", "CAST", "IDENTITY",
                               "SELECT", "SCATTER", "PADDING", "FILL", "SQUEEZE", "UNSQUEEZE"})
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


def select_fp32_layers(layers: Sequence[LayerInfo]) -> list[str]:
    """Names of the layers to keep in fp32, in network order (the rules are the module docstring's).

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

    def floating(i: int) -> bool:
        return bool(g.layers[i].float_outputs)

    def in_tail(i: int) -> bool:
        return not dense[i] and not feeds_dense[i]

    keep = [floating(i) and ((g.layers[i].kind, g.layers[i].op) in FP32_ALWAYS
                             or (g.layers[i].kind in ARITHMETIC_KINDS and in_tail(i)))
            for i in range(n)]
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
            upstream[idx] = any(keep[c] or upstream[c] for t in g.layers[idx].outputs for c in g.consumers.get(t, ()))
    return [g.layers[i].name for i in range(n) if keep[i] or downstream[i] or upstream[i]]
