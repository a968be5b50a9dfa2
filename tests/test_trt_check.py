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
def test_exported_networks_pass(square_export, model):
    _, paths = square_export
    m = onnx.load(str(paths[model]))
    check_tensorrt_ready(m)
    assert m.opset_import[0].version >= 17
    ops = {n.op_type for n in m.graph.node}
    assert "TopK" in ops if model == "rpn" else "Softmax" in ops


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


def test_rejects_an_intermediate_with_a_data_dependent_dimension():
    """Slice to an end read from data: the intermediate's length is a fresh symbol (``unk__0``) that
    no input's shape determines, though the output's shape looks fine."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    nodes = [helper.make_node("Slice", ["x", "zero", "n", "zero"], ["head"], name="slice_to_data"),
             helper.make_node("ReduceSum", ["head", "zero"], ["total"], name="sum", keepdims=1),
             helper.make_node("Add", ["x", "total"], ["y"], name="add")]
    with pytest.raises(NotTensorRTReady, match=r"node 'slice_to_data' \(op Slice\): output 'head' has "
                                               r"data-dependent dimensions \['unk__\d+'\]"):
        check_tensorrt_ready(_model(nodes, [x, n], [y], [zero]))


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
