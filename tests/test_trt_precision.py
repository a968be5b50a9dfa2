"""The fp16 engine's fp32 layer policy (exporters/tensorrt/precision.py) on graphs shaped the way
TensorRT's ONNX parser builds them.

:class:`ParserGraph` lays layers out as onnx-tensorrt does (https://github.com/onnx/onnx-tensorrt,
``onnxOpImporters.cpp`` and ``importerUtils.cpp``):

* Conv with an initializer bias: one CONVOLUTION layer, the bias inside it.
* Gemm: its weight is a CONSTANT, then MATRIX_MULTIPLY; its rank-1 bias is a CONSTANT that
  ``broadcastTensors`` reshapes to the product's rank with a SHUFFLE, then an ELEMENTWISE SUM.
* Add/Mul/Sub/...: ``elementwiseHelper`` turns an initializer operand into a CONSTANT, broadcasts
  every operand of lower rank with a SHUFFLE, then one ELEMENTWISE layer.
* Reshape/Transpose/Flatten: SHUFFLE; Gather: GATHER; Slice: SLICE; Concat: CONCATENATION;
  Where: SELECT; Resize: RESIZE; TopK: TOPK with float values and int32 indices.
* Shape arithmetic (sizes, TopK's k, Resize scales) yields shape tensors (``ITensor.is_shape_tensor``).
"""
from __future__ import annotations

import pytest

from exporters.tensorrt.precision import LayerInfo, fp32_constraints, select_fp32_layers


class ParserGraph:
    """A list of :class:`LayerInfo` built op by op like the ONNX parser; tensors carry their rank."""

    def __init__(self, **inputs: int):
        self.layers: list[LayerInfo] = []
        self.rank: dict[str, int] = dict(inputs)  # network inputs: name -> rank
        self._count = 0

    def _add(self, name: str, kind: str, inputs, rank: int, op: str | None = None, dtypes=("FLOAT",),
             shape: tuple[int, ...] = ()) -> list[str]:
        outs = [f"{name}:{i}" for i in range(len(dtypes))]
        floats = tuple(i for i, d in enumerate(dtypes) if d in ("FLOAT", "HALF"))
        self.layers.append(LayerInfo(name, kind, op, tuple(inputs), tuple(outs), floats, shape))
        for o in outs:
            self.rank[o] = rank
        return outs

    def _unique(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, name: str, rank: int) -> str:
        return self._add(name, "CONSTANT", (), rank)[0]

    def _broadcast(self, tensor: str, rank: int) -> str:
        """importerUtils.cpp broadcastTensor: a SHUFFLE prepends 1s to a lower-rank operand."""
        if self.rank[tensor] >= rank:
            return tensor
        return self._add(self._unique("ONNXTRT_Broadcast"), "SHUFFLE", (tensor,), rank)[0]

    def binary(self, name: str, op: str, a: str, b: str, dtype: str = "FLOAT", shape: bool = False) -> str:
        rank = max(self.rank[a], self.rank[b])
        a, b = self._broadcast(a, rank), self._broadcast(b, rank)
        return self._add(name, "ELEMENTWISE", (a, b), rank, op, (dtype,), (0,) if shape else ())[0]

    def add_initializer(self, name: str, op: str, x: str, rank: int) -> str:
        """``x <op> initializer`` (the initializer of rank ``rank`` becomes a CONSTANT)."""
        return self.binary(name, op, x, self.constant(f"{name}.init", rank))

    def conv(self, name: str, x: str) -> str:
        return self._add(name, "CONVOLUTION", (x,), 4)[0]

    def gemm(self, name: str, x: str) -> str:
        w = self.constant(f"{name}.weight", 2)
        product = self._add(f"{name}.matmul", "MATRIX_MULTIPLY", (x, w), 2)[0]
        return self.binary(name, "SUM", product, self.constant(f"{name}.bias", 1))

    def frozen_bn(self, name: str, x: str) -> str:
        """torchvision FrozenBatchNorm2d: x * scale + shift, both [1, C, 1, 1] initializers."""
        return self.add_initializer(f"{name}.shift", "SUM", self.add_initializer(f"{name}.scale", "PROD", x, 4), 4)

    def unary(self, name: str, kind: str, x: str, op: str | None = None, dtype: str = "FLOAT") -> str:
        return self._add(name, kind, (x,), self.rank[x], op, (dtype,))[0]

    def shuffle(self, name: str, x: str, rank: int) -> str:
        return self._add(name, "SHUFFLE", (x,), rank)[0]

    def slice(self, name: str, x: str) -> str:
        return self._add(name, "SLICE", (x,), self.rank[x])[0]

    def gather(self, name: str, data: str, indices: str) -> str:
        return self._add(name, "GATHER", (data, indices), self.rank[data])[0]

    def concat(self, name: str, *xs: str) -> str:
        return self._add(name, "CONCATENATION", xs, self.rank[xs[0]])[0]

    def select(self, name: str, cond: str, a: str, b: str) -> str:
        return self._add(name, "SELECT", (cond, a, b), self.rank[a])[0]

    def topk(self, name: str, x: str) -> tuple[str, str]:
        values, indices = self._add(name, "TOPK", (x,), self.rank[x], dtypes=("FLOAT", "INT32"))
        return values, indices


def _pinned(g: ParserGraph) -> set[str]:
    return set(select_fp32_layers(g.layers))


def test_gemm_bias_adds_stay_fp16():
    """TwoMLPHead + predictor: every Gemm's bias arrives through CONSTANT -> SHUFFLE -> SUM."""
    g = ParserGraph(roi_features=2)
    x = g.unary("fc6_relu", "ACTIVATION", g.gemm("fc6", "roi_features"), "RELU")
    x = g.unary("fc7_relu", "ACTIVATION", g.gemm("fc7", x), "RELU")
    logits = g.gemm("cls_score", x)
    g.unary("softmax", "SOFTMAX", logits)
    pinned = _pinned(g)
    assert pinned == {"softmax"}
    shuffles = [layer.name for layer in g.layers if layer.kind == "SHUFFLE"]
    assert len(shuffles) == 3  # one broadcast per Gemm bias, as the parser makes
    for name in ("fc6", "fc7", "cls_score", *shuffles, "fc6.bias", "cls_score.bias"):
        assert name not in pinned, name


def test_residual_and_fpn_adds_stay_fp16():
    """A bottleneck's residual sum and an FPN top-down sum (two activations) feed convolutions."""
    g = ParserGraph(images=4)
    stem = g.unary("stem_relu", "ACTIVATION", g.frozen_bn("bn1", g.conv("conv1", "images")), "RELU")
    branch = g.frozen_bn("bn3", g.conv("conv3", g.conv("conv2", stem)))
    shortcut = g.frozen_bn("down_bn", g.conv("downsample", stem))
    c3 = g.unary("block_relu", "ACTIVATION", g.binary("residual_add", "SUM", branch, shortcut), "RELU")
    c4 = g.conv("layer3", c3)
    top = g.unary("upsample", "RESIZE", g.conv("inner_p4", c4))
    p3 = g.binary("fpn_add", "SUM", g.conv("inner_p3", c3), top)
    g.conv("layer_p3", p3)
    assert _pinned(g) == set()


def test_header_decode_keeps_coordinates_in_fp32():
    """header: bbox_pred -> reshape -> slices -> decode with the RoIs (BoxCoder.decode_single) ->
    stack -> class_boxes; scores -> softmax -> class_scores."""
    g = ParserGraph(roi_features=2, rois=2)
    x = g.unary("fc7_relu", "ACTIVATION", g.gemm("fc7", "roi_features"), "RELU")
    g.unary("softmax", "SOFTMAX", g.gemm("cls_score", x))
    deltas = g.shuffle("deltas_reshape", g.gemm("bbox_pred", x), 3)
    dx, dw = g.slice("dx", deltas), g.slice("dw", deltas)
    x1, x2 = g.slice("rois_x1", "rois"), g.slice("rois_x2", "rois")
    widths = g.binary("widths", "SUB", x2, x1)
    ctr = g.binary("ctr_x", "SUM", x1, g.add_initializer("half_width", "PROD", widths, 0))
    scaled = g.add_initializer("dx_weight", "DIV", dx, 0)
    pred_ctr = g.binary("pred_ctr", "SUM", g.binary("dx_w", "PROD", scaled, g.shuffle("widths_col", widths, 3)),
                        g.shuffle("ctr_col", ctr, 3))
    pred_w = g.binary("pred_w", "PROD", g.unary("exp", "UNARY", g.add_initializer("dw_clip", "MIN", dw, 0), "EXP"),
                      g.shuffle("widths_col2", widths, 3))
    g.shuffle("class_boxes", g.concat("stack", g.binary("left", "SUB", pred_ctr, pred_w), pred_ctr), 3)
    pinned = _pinned(g)
    # data movers on the decode path, upstream (RoIs, deltas, constants) and downstream (outputs)
    for name in ("deltas_reshape", "dx", "dw", "rois_x1", "rois_x2", "widths_col", "ctr_col", "widths_col2",
                 "stack", "class_boxes"):
        assert name in pinned, name
    # the decode's constants are read by pinned layers but take no constraint themselves
    for name in ("half_width.init", "dx_weight.init", "dw_clip.init"):
        assert name not in pinned, name
    for name in ("widths", "ctr_x", "half_width", "pred_ctr", "pred_w", "exp", "left", "softmax"):
        assert name in pinned, name
    # the dense layers and their bias adds stay fp16; the bias constants are not decode inputs
    for name in ("fc7", "cls_score", "bbox_pred", "bbox_pred.bias", "fc7_relu"):
        assert name not in pinned, name


def test_rpn_tail_moves_anchors_and_boxes_in_fp32():
    """rpn (exporters/split.py RpnNetwork): head logits -> permute/reshape -> mask (Where) -> TopK ->
    Gather of deltas and anchors -> decode -> clip -> stack; the feature maps leave as outputs."""
    g = ParserGraph(images=4, image_sizes=2)
    feature = g.conv("fpn_p2", "images")
    g.shuffle("features_p2", feature, 4)  # channels-last output of the feature map
    head = g.unary("head_relu", "ACTIVATION", g.conv("head_conv", feature), "RELU")
    logits = g.shuffle("logits_flat", g.conv("cls_logits", head), 2)
    deltas = g.shuffle("deltas_flat", g.conv("bbox_pred", head), 3)
    valid = g.binary("valid", "LESS", "image_sizes", "image_sizes", dtype="BOOL")
    masked = g.select("masked", valid, logits, g.add_initializer("minus_inf", "SUM", logits, 0))
    top, idx = g.topk("topk", masked)
    prob = g.unary("sigmoid", "ACTIVATION", top, "SIGMOID")
    sel_deltas = g.gather("gather_deltas", deltas, idx)
    sel_anchors = g.gather("gather_anchors", g.constant("anchors", 3), idx)
    boxes = g.binary("decode", "SUM", g.binary("scale", "PROD", sel_deltas, sel_anchors), sel_anchors)
    clipped = g.binary("clip", "MIN", boxes, g.shuffle("size_col", g.slice("width", "image_sizes"), 3))
    g.concat("proposals", clipped, g.shuffle("prob_col", prob, 3))
    constraints = fp32_constraints(g.layers)
    pinned = set(constraints.layers)
    for name in ("gather_anchors", "gather_deltas", "deltas_flat", "logits_flat", "masked",
                 "sigmoid", "decode", "scale", "clip", "width", "size_col", "prob_col", "proposals"):
        assert name in pinned, name
    # the body, the feature outputs and the boolean mask are not; nor are the anchors' constant and
    # TopK (int32 indices), whose values output alone is typed fp32
    for name in ("fpn_p2", "features_p2", "head_conv", "head_relu", "cls_logits", "bbox_pred", "valid", "anchors",
                 "topk"):
        assert name not in pinned, name
    assert constraints.outputs == {"topk": (0,)}


def test_range_layers_stay_fp32_inside_the_body():
    """exp and softmax are pinned even where a convolution follows (an attention-like block)."""
    g = ParserGraph(x=4)
    a = g.conv("conv_a", "x")
    w = g.unary("weights", "SOFTMAX", a)
    e = g.unary("exp", "UNARY", a, "EXP")
    g.conv("conv_out", g.binary("mix", "PROD", w, e))
    assert _pinned(g) == {"weights", "exp"}


def test_layers_without_float_outputs_are_never_pinned():
    g = ParserGraph(images=4)
    shape = g.unary("shape", "SHAPE", "images", dtype="INT32")
    n = g.binary("shape_prod", "PROD", shape, shape, dtype="INT32")
    g.gather("shape_gather", n, n)
    g.binary("tail_less", "LESS", g.conv("conv", "images"), g.conv("conv2", "images"), dtype="BOOL")
    assert _pinned(g) == set()


@pytest.mark.parametrize("op", ["SUM", "SUB"])
def test_a_sum_with_a_constant_after_decode_math_is_not_a_bias_add(op):
    """Only ``dense output + constant`` is a bias add; ``decode result + constant`` is decode math."""
    g = ParserGraph(rois=2)
    half = g.add_initializer("half", "PROD", "rois", 0)
    g.add_initializer("offset", op, half, 1)
    # the math and its constants' broadcasts; the constants themselves take no constraint
    assert _pinned(g) == {layer.name for layer in g.layers if layer.kind != "CONSTANT"}
    assert {layer.kind for layer in g.layers} == {"CONSTANT", "SHUFFLE", "ELEMENTWISE"}


# ----------------------------------------------------------------------------------------------
# layers that take no constraint (Polygraphy's precision tool skips the same: CONSTANT layers and any
# layer with an output that is not a float execution tensor)
# ----------------------------------------------------------------------------------------------

def _tail_with_constant() -> ParserGraph:
    """rois * 0.5 + offset: decode math whose operands are CONSTANTs broadcast by SHUFFLEs."""
    g = ParserGraph(rois=2)
    g.add_initializer("offset", "SUM", g.add_initializer("half", "PROD", "rois", 0), 1)
    return g


def test_constants_are_never_constrained():
    g = _tail_with_constant()
    constants = {layer.name for layer in g.layers if layer.kind == "CONSTANT"}
    assert constants == {"half.init", "offset.init"}
    pinned = _pinned(g)
    assert pinned and not pinned & constants
    assert {layer.name for layer in g.layers if layer.kind == "SHUFFLE"} <= pinned  # their broadcasts are


def test_topk_takes_no_precision_and_only_its_values_output_type():
    """TopK's indices output is int32: the layer takes no precision; its values output is typed fp32
    and the layer feeding it is pinned."""
    g = ParserGraph(logits=2)
    flat = g.shuffle("logits_flat", g.add_initializer("masked", "SUM", "logits", 0), 2)
    values, _ = g.topk("topk", flat)
    g.unary("sigmoid", "ACTIVATION", values, "SIGMOID")
    constraints = fp32_constraints(g.layers)
    assert "topk" not in constraints.layers
    assert constraints.outputs == {"topk": (0,)}
    assert {"logits_flat", "masked", "sigmoid"} <= set(constraints.layers)


def test_a_convolution_feeding_topk_is_pinned():
    """Nothing between the logits and TopK: the convolution itself delivers them in fp32."""
    g = ParserGraph(images=4)
    logits = g.conv("cls_logits", g.conv("head", "images"))
    g.topk("topk", logits)
    constraints = fp32_constraints(g.layers)
    assert constraints.layers == ("cls_logits",)
    assert constraints.outputs == {"topk": (0,)}


def test_shape_tensor_layers_are_never_constrained():
    """Float arithmetic on sizes that yields a shape tensor (Resize scales, TopK's k) takes no
    constraint, and does not pull the data movers around it into fp32."""
    g = ParserGraph(image_sizes=1, masks=4)
    width = g.slice("width", "image_sizes")
    scale = g.binary("scale", "DIV", width, g.constant("stride", 1), shape=True)
    scales = g._add("scales", "CONCATENATION", (scale,), 1, shape=(0,))[0]
    g._add("upsample", "RESIZE", ("masks", scales), 4)
    g._add("shape", "SHAPE", ("masks",), 1, dtypes=("INT64",), shape=(0,))
    g._add("shape_as_float", "SHAPE", ("masks",), 1, shape=(0,))  # even where a float output is claimed
    constraints = fp32_constraints(g.layers)
    assert constraints.layers == () and constraints.outputs == {}


def test_a_layer_with_a_float_and_an_integer_output_takes_no_constraint():
    g = ParserGraph(x=2)
    values = g._add("argmax_and_max", "REDUCE", ("x",), 2, dtypes=("FLOAT", "INT32"))[0]
    g.unary("exp", "UNARY", values, "EXP")
    constraints = fp32_constraints(g.layers)
    assert constraints.layers == ("exp",) and constraints.outputs == {}
