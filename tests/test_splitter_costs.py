"""FLOPs and parameters against hand-computed counts, one op type at a time.

Convention (README "JSON outputs"): FLOPs = 2 x multiply-accumulates for the conv and
matmul families (bias adds not counted), one per output element for elementwise ops and
activations, one per window element per output for pooling, one per input element for
global pooling and reductions; data movement (Reshape, Transpose, Concat…) is free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitter import inspect_model
from splitter.cuts import node_flops


def _flops(op: str, inputs: dict[str, tuple[int, ...]], out: tuple[int, ...],
           **attrs: Any) -> int:
    shapes = {**inputs, "out": out}
    node = helper.make_node(op, list(inputs), ["out"], **attrs)
    return node_flops(node, shapes.get)


@pytest.mark.parametrize(("op", "inputs", "out", "attrs", "expected"), [
    # Conv: 2 * N*Cout*Ho*Wo * (Cin/g)*kh*kw
    ("Conv", {"x": (1, 3, 32, 32), "w": (16, 3, 3, 3)}, (1, 16, 32, 32), {},
     2 * 16 * 32 * 32 * 27),
    # depthwise (group = C): each output sees one input channel
    ("Conv", {"x": (1, 8, 16, 16), "w": (8, 1, 3, 3)}, (1, 8, 16, 16), {"group": 8},
     2 * 8 * 16 * 16 * 9),
    # grouped (group 2): Cin/g = 4
    ("Conv", {"x": (2, 8, 10, 10), "w": (6, 4, 1, 1)}, (2, 6, 10, 10), {"group": 2},
     2 * 2 * 6 * 100 * 4),
    # ConvTranspose: every input element scatters into Cout/g * kh*kw outputs
    ("ConvTranspose", {"x": (1, 4, 8, 8), "w": (4, 2, 2, 2)}, (1, 2, 16, 16), {"strides": [2, 2]},
     2 * 4 * 64 * 2 * 4),
    # Gemm M=3 K=20 N=7 (transB)
    ("Gemm", {"a": (3, 20), "b": (7, 20)}, (3, 7), {"transB": 1}, 2 * 3 * 7 * 20),
    ("Gemm", {"a": (20, 3), "b": (20, 7)}, (3, 7), {"transA": 1}, 2 * 3 * 7 * 20),
    # batched MatMul: 4 heads of (5x6)@(6x9)
    ("MatMul", {"a": (2, 4, 5, 6), "b": (2, 4, 6, 9)}, (2, 4, 5, 9), {}, 2 * 2 * 4 * 5 * 9 * 6),
    ("MatMul", {"a": (6,), "b": (6, 9)}, (9,), {}, 2 * 9 * 6),
    ("MaxPool", {"x": (1, 4, 8, 8)}, (1, 4, 4, 4), {"kernel_shape": [2, 2], "strides": [2, 2]},
     4 * 16 * 4),
    ("AveragePool", {"x": (1, 4, 9, 9)}, (1, 4, 3, 3), {"kernel_shape": [3, 3],
                                                        "strides": [3, 3]}, 4 * 9 * 9),
    ("GlobalAveragePool", {"x": (2, 4, 7, 7)}, (2, 4, 1, 1), {}, 2 * 4 * 49),
    ("Add", {"a": (2, 3, 4), "b": (4,)}, (2, 3, 4), {}, 24),
    ("Relu", {"x": (5, 6)}, (5, 6), {}, 30),
    ("Reshape", {"x": (5, 6), "s": (2,)}, (30,), {}, 0),
    # quantized forms: same MACs as their float op
    ("QLinearConv", {"x": (1, 3, 8, 8), "xs": (), "xz": (), "w": (4, 3, 3, 3), "ws": (),
                     "wz": (), "ys": (), "yz": ()}, (1, 4, 8, 8), {}, 2 * 4 * 64 * 27),
    ("ConvInteger", {"x": (1, 3, 8, 8), "w": (4, 3, 3, 3)}, (1, 4, 8, 8), {},
     2 * 4 * 64 * 27),
    ("QLinearMatMul", {"a": (3, 20), "as": (), "az": (), "b": (20, 7), "bs": (), "bz": (),
                       "ys": (), "yz": ()}, (3, 7), {}, 2 * 3 * 7 * 20),
    ("MatMulInteger", {"a": (3, 20), "b": (20, 7)}, (3, 7), {}, 2 * 3 * 7 * 20),
    # recurrent: 2 * seq*batch*dirs * gates*hidden*(input+hidden); X [seq, batch, input]
    ("LSTM", {"x": (5, 2, 10), "w": (1, 32, 10), "r": (1, 32, 8)}, (5, 1, 2, 8),
     {"hidden_size": 8}, 2 * 5 * 2 * 4 * 8 * (10 + 8)),
    # hidden size from W when the attribute is missing: 20 rows / 4 gates = 5
    ("LSTM", {"x": (3, 1, 4), "w": (1, 20, 4), "r": (1, 20, 5)}, (3, 1, 1, 5), {},
     2 * 3 * 1 * 4 * 5 * (4 + 5)),
    ("GRU", {"x": (7, 3, 6), "w": (2, 12, 6), "r": (2, 12, 4)}, (7, 2, 3, 4),
     {"hidden_size": 4, "direction": "bidirectional"}, 2 * 7 * 3 * 2 * 3 * 4 * (6 + 4)),
    # layout=1: X [batch, seq, input]
    ("RNN", {"x": (2, 9, 5), "w": (1, 16, 5), "r": (1, 16, 16)}, (2, 9, 1, 16),
     {"hidden_size": 16, "layout": 1, "direction": "reverse"}, 2 * 9 * 2 * 1 * 16 * (5 + 16)),
])
def test_node_flops_by_hand(op: str, inputs: dict[str, tuple[int, ...]], out: tuple[int, ...],
                            attrs: dict[str, Any], expected: int) -> None:
    assert _flops(op, inputs, out, **attrs) == expected


def test_qdq_conv_counts_as_a_conv_and_constants_hold_parameters() -> None:
    """A folded export: the weight sits in a Constant node, behind a DequantizeLinear."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "wq")
    bias = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["wq"], value=w),
        helper.make_node("Constant", [], ["bias"], value=bias),
        helper.make_node("Constant", [], ["shape"], value=shape),  # a shape: not a weight
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wf"]),
        helper.make_node("Conv", ["x", "wf", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "folded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "ws")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    result = inspect_model(model)
    assert result.total_params == 108 + 4 + 1  # int8 weight, bias, its scale
    conv = 2 * 4 * 64 * 27
    # A weight's DequantizeLinear computes from constants only: folded once, not per sample.
    assert result.total_flops == conv + 256
    relu_cut = {c.names: c for c in result.cuts}[("c",)]
    assert relu_cut.head_flops == conv and relu_cut.head_params == 113


def test_lstm_model_counts_its_recurrence() -> None:
    """An LSTM in a model: inspect's totals include its 2·MACs, not 0."""
    seq, batch, inp, hidden = 49, 1, 40, 64
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random(s, np.float32), n) for n, s in
             (("w", (1, 4 * hidden, inp)), ("r", (1, 4 * hidden, hidden)),
              ("b", (1, 8 * hidden)))]
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=hidden)], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    result = inspect_model(model)
    assert result.total_flops == 2 * seq * batch * 4 * hidden * (inp + hidden)
    assert result.total_params == 4 * hidden * (inp + hidden) + 8 * hidden


def test_constant_of_shape_fills_with_constant_shapes_are_parameters() -> None:
    """A stripped export's weights as fills: ConstantOfShape with a constant shape input
    (initializer or Constant node) holds its output's elements; an int64 vector fill is
    a shape, like an int64 vector Constant, and counts nothing."""
    shape_init = numpy_helper.from_array(np.array([4, 8], np.int64), "w_shape")
    b_shape = numpy_helper.from_array(np.array([8], np.int64), "b_shape")
    i_shape = numpy_helper.from_array(np.array([3], np.int64), "i_shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"]),  # float32 zeros [4, 8]
        helper.make_node("Constant", [], ["b_shape"], value=b_shape),
        helper.make_node("ConstantOfShape", ["b_shape"], ["b"],
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("ConstantOfShape", ["i_shape"], ["ints"],  # int64 [3]: not a weight
                         value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Cast", ["ints"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f"], ["s"], keepdims=0),
        helper.make_node("Add", ["a", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fills", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=[shape_init, i_shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    result = inspect_model(model)
    assert result.total_params == 4 * 8 + 8
    cut = {c.names: c for c in result.cuts}[("m",)]
    assert cut.head_params == 32


def test_constant_of_shape_from_a_runtime_shape_is_not_a_parameter() -> None:
    """A fill sized by the input (zeros like x) is computed per run, not a weight."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("ConstantOfShape", ["xs"], ["z"]),
        helper.make_node("Add", ["x", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "zeros_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert inspect_model(model).total_params == 0


def _nonzero_model() -> onnx.ModelProto:
    """Static input [1, 4]; NonZero's output [2, ?] has a data-dependent dim that shape
    inference cannot size, so the cuts it (and its Cast) cross have null bytes."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("NonZero", ["r"], ["nz"]),
        helper.make_node("Cast", ["nz"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f"], ["s"], keepdims=1),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "nonzero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_null_bytes_without_symbolic_inputs_name_their_tensors() -> None:
    result = inspect_model(_nonzero_model())
    data = result.to_dict()
    assert data["unknown_dims"] == []  # no symbolic input dim explains them
    assert data["unsized_tensors"] == ["nz", "f"]
    null = [c for c in data["cuts"] if c["bytes_per_sample"] is None]
    assert null and all(any(t["name"] in data["unsized_tensors"] for t in c["tensors"])
                        for c in null)
    sized = [c for c in data["cuts"] if c["bytes_per_sample"] is not None]
    assert all(t["name"] not in data["unsized_tensors"] for c in sized for t in c["tensors"])
    # at a given input shape the tensors are measured (one onnxruntime run): none left
    fixed = inspect_model(_nonzero_model(), input_shapes={"x": (1, 4)})
    assert fixed.unsized_tensors == ()
    assert all(c.bytes_per_sample is not None for c in fixed.cuts)


def test_unsized_tensors_include_those_of_symbolic_input_dims() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])],
        "sym", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = inspect_model(model)
    assert [(d["tensor"], d["axis"]) for d in result.unknown_dims] == [("x", 1)]
    assert result.unsized_tensors == ("x", "r")
