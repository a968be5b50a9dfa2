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
