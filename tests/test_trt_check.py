"""The TensorRT-readiness check passes the exported graphs and names the node it rejects."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from exporters.trt_check import NotTensorRTReady, check_tensorrt_ready


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])


@pytest.mark.parametrize("model", ["rpn", "header"])
def test_exported_networks_pass(small_export, model):
    """The real exports, with their declared dynamic axes: the rpn's batch, height and width (its
    map sizes, anchor grids and extent masks computed from Shape ops), the header's RoI count."""
    from exporters.onnx_export import NUM_ROIS, rpn_dynamic_axes

    settings, paths = small_export
    m = onnx.load(str(paths[model]))
    axes = rpn_dynamic_axes(settings) if model == "rpn" else {NUM_ROIS: 8}
    check_tensorrt_ready(m, axes)
    assert m.opset_import[0].version >= 17
    ops = {n.op_type for n in m.graph.node}
    assert {"TopK", "Range", "Shape"} <= ops if model == "rpn" else "Softmax" in ops
    if model == "rpn":
        assert [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [
            "batch", 3, "height", "width"]
        with pytest.raises(NotTensorRTReady, match=r"input 'images' has a dynamic dimension 2 \('height'\), which is "
                                                   r"not a declared dynamic axis \(declared: axis 0 \(the batch\)\)"):
            check_tensorrt_ready(m)


def test_passes_a_plain_graph():
    check_tensorrt_ready(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [X], [Y]))


@pytest.mark.parametrize("op", ["NonZero", "NonMaxSuppression", "RoiAlign", "Unique"])
def test_rejects_banned_op_by_name(op):
    node = helper.make_node(op, ["x"], ["y"], name="the_bad_one")
    with pytest.raises(NotTensorRTReady, match=rf"node 'the_bad_one' \(op {op}\)"):
        check_tensorrt_ready(_model([node], [X], [Y]))


def test_rejects_if_inside_a_graph():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch, else_branch=branch)
    with pytest.raises(NotTensorRTReady, match=r"'branchy' \(op If\)"):
        check_tensorrt_ready(_model([node], [X, cond], [Y]))


def test_rejects_topk_with_k_from_data():
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", 4])
    node = helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk_data", axis=1)
    with pytest.raises(NotTensorRTReady, match=r"'topk_data' \(op TopK\) takes input 1"):
        check_tensorrt_ready(_model([node], [X, k], [Y, idx]))


def test_rejects_old_opset():
    with pytest.raises(NotTensorRTReady, match="opset 13"):
        check_tensorrt_ready(_model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], opset=13))


def test_rejects_dynamic_non_batch_dimension():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])
    with pytest.raises(NotTensorRTReady, match="input 'x' has a dynamic dimension 1"):
        check_tensorrt_ready(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]))


def test_rejects_data_dependent_output_shape():
    shape = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape_from_data")
    with pytest.raises(NotTensorRTReady, match="output 'y'"):
        check_tensorrt_ready(_model([node], [X, shape], [y]))


def test_rejects_a_slice_to_an_end_read_from_data():
    """Slice to an end read from data: the intermediate's length depends on data, though the
    output's shape looks fine."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    nodes = [helper.make_node("Slice", ["x", "zero", "n", "zero"], ["head"], name="slice_to_data"),
             helper.make_node("ReduceSum", ["head", "zero"], ["total"], name="sum", keepdims=1),
             helper.make_node("Add", ["x", "total"], ["y"], name="add")]
    with pytest.raises(NotTensorRTReady, match=r"node 'slice_to_data' \(op Slice\) takes input 2 \('n'\) from data, "
                                               r"so its output shape is data dependent"):
        check_tensorrt_ready(_model(nodes, [x, n], [y], [zero]))


def test_rejects_a_reshape_whose_shape_is_computed_from_data():
    """The shape is the data's maximum, cast: computed, but from values rather than shapes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    nodes = [helper.make_node("ReduceMax", ["x"], ["top"], name="max", keepdims=0),
             helper.make_node("Cast", ["top"], ["top_int"], name="cast", to=TensorProto.INT64),
             helper.make_node("Shape", ["x"], ["shape"], name="shape", start=0, end=1),
             helper.make_node("Unsqueeze", ["top_int", "zero"], ["n"], name="unsqueeze"),
             helper.make_node("Concat", ["shape", "n"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape_from_data")]
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    with pytest.raises(NotTensorRTReady, match=r"node 'reshape_from_data' \(op Reshape\) takes input 1 \('target'\) "
                                               r"from data"):
        check_tensorrt_ready(_model(nodes, [x], [y], [zero]))


def test_rejects_a_dimension_that_follows_from_no_input_shape():
    """MaxUnpool to an output shape read from data: no shape input of the list, caught when the
    declared axes are bound and every shape computation folded."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4])
    indices = helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", 1, 4, 4])
    shape = helper.make_tensor_value_info("s", TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, "h", "w"])
    node = helper.make_node("MaxUnpool", ["x", "i", "s"], ["y"], name="unpool", kernel_shape=[2, 2], strides=[2, 2])
    with pytest.raises(NotTensorRTReady, match=r"node 'unpool' \(op MaxUnpool\): output 'y' has data-dependent "
                                               r"dimensions"):
        check_tensorrt_ready(_model([node], [x, indices, shape], [y]))


def _canvas_graph():
    """x [batch, 3, height, width] -> a row mask (Range over the height read with Shape, as the rpn's
    extent masks) multiplied in, then a Reshape to [batch, 3 * height * width] computed from Shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "flat"])
    consts = [helper.make_tensor(n, TensorProto.INT64, [len(v)], v)
              for n, v in (("two", [2]), ("zero", [0]), ("one", [1]), ("minus_one", [-1]))]
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "two"], ["h1"], name="height", axis=0),
             helper.make_node("Squeeze", ["h1", "zero"], ["h"], name="squeeze"),
             helper.make_node("Range", ["zero_scalar", "h", "one_scalar"], ["rows"], name="rows"),
             helper.make_node("Cast", ["rows"], ["rows_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Less", ["rows_f", "limit"], ["inside"], name="less"),
             helper.make_node("Cast", ["inside"], ["mask"], name="mask", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "one"], ["mask2"], name="unsqueeze"),
             helper.make_node("Mul", ["x", "mask2"], ["masked"], name="mul"),
             helper.make_node("Slice", ["shape", "zero", "one"], ["batch"], name="batch"),
             helper.make_node("Concat", ["batch", "minus_one"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["masked", "target"], ["y"], name="flatten")]
    consts += [helper.make_tensor("zero_scalar", TensorProto.INT64, [], [0]),
               helper.make_tensor("one_scalar", TensorProto.INT64, [], [1]),
               helper.make_tensor("limit", TensorProto.FLOAT, [], [100.0])]
    return _model(nodes, [x], [y], consts)


def test_declared_height_and_width_with_shapes_computed_from_them_pass():
    check_tensorrt_ready(_canvas_graph(), {"batch": 2, "height": 64, "width": 96})
    with pytest.raises(NotTensorRTReady, match=r"input 'x' has a dynamic dimension 3 \('width'\), which is not a "
                                               r"declared dynamic axis \(declared: batch, height\)"):
        check_tensorrt_ready(_canvas_graph(), {"batch": 2, "height": 64})


def test_declared_dynamic_axes_and_shapes_derived_from_them_pass():
    """Flatten of [batch, 2, 2] and a Reshape to [batch, -1]: dimensions computed from the inputs'."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape")]
    check_tensorrt_ready(_model(nodes, [x], [y], [shape]))


def _topk_model(k: int):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5000])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", k])
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", k])
    kk = helper.make_tensor("k", TensorProto.INT64, [1], [k])
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="pre_nms_topk", axis=1)
    return _model([node], [x], [values, indices], [kk])


def test_topk_k_must_be_below_tensorrts_limit():
    check_tensorrt_ready(_topk_model(3839))
    with pytest.raises(NotTensorRTReady, match=r"node 'pre_nms_topk' \(op TopK\) has K=3840; TensorRT's TopK "
                                               r"needs K < 3840"):
        check_tensorrt_ready(_topk_model(3840))


def test_topk_k_from_a_constant_node_is_checked():
    m = _topk_model(4000)
    del m.graph.initializer[:]
    m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], name="k_const",
                                            value=helper.make_tensor("kv", TensorProto.INT64, [1], [4000])))
    with pytest.raises(NotTensorRTReady, match="has K=4000"):
        check_tensorrt_ready(m)
