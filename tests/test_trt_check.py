"""The static TensorRT check: one graph per rule that breaks it, and graphs that pass."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from detkd.export.trt_check import (  # noqa: E402
    ExportError, assert_tensorrt_compatible, check_model, default_matrix, parse_matrix,
)

F, I64, B, U8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.UINT8


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _x(name="x", shape=("N", 3, 8, 8), dtype=F):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _y(name="y", dtype=F, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def _rules(model):
    return [(v.node, v.rule) for v in check_model(model)]


def test_matrix_is_the_trt10_15_table():
    m = default_matrix()
    assert m.version == "10.15" and m.opset_range == (9, 24)
    assert m.ops["Conv"].supported and "FP32" in m.ops["Conv"].types
    assert not m.ops["Unique"].supported
    assert "INT64" in m.ops["ConstantOfShape"].types
    assert m.ops["RoiAlign"].types == {"FP32", "FP16"} and m.ops["NonMaxSuppression"].types == {"FP32", "FP16"}
    assert "3840" in m.ops["TopK"].restrictions
    with pytest.raises(ValueError, match="not an onnx-tensorrt operator matrix"):
        parse_matrix("# nothing here")


def test_a_plain_conv_net_with_dynamic_batch_passes():
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMax", ["r", "axes"], ["y"], name="rmax", keepdims=0)]
    model = _model(nodes, [_x()], [_y()], [w, _const("axes", [2, 3])], opset=18)
    assert check_model(model) == []
    assert_tensorrt_compatible(model, "ok.onnx")


def test_unsupported_op_custom_domain_and_opset():
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="uniq"),
             helper.make_node("MyNMS", ["x"], ["z"], name="plug", domain="com.example")]
    model = _model(nodes, [_x()], [_y(), _y("z")], opset=25)
    assert set(_rules(model)) == {("<model>", "opset"), ("uniq", "unsupported"), ("plug", "unsupported")}
    ok = _model([helper.make_node("EfficientNMS_TRT", ["x"], ["y"], name="nms", domain="trt.plugins")],
                [_x()], [_y()])
    assert _rules(ok) == []


def test_type_rules_nonzero_on_bool_and_uint8_inside_the_graph():
    nodes = [helper.make_node("Greater", ["x", "t"], ["m"], name="gt"),
             helper.make_node("NonZero", ["m"], ["y"], name="nz")]  # torchvision's masks: BOOL NonZero
    model = _model(nodes, [_x()], [_y(dtype=I64)], [numpy_helper.from_array(np.float32(0.5).reshape(()), "t")])
    assert _rules(model) == [("nz", "type")]
    nodes = [helper.make_node("Cast", ["x"], ["u"], name="to_u8", to=U8),
             helper.make_node("Cast", ["u"], ["y"], name="from_u8", to=F)]
    assert ("from_u8", "type") in _rules(_model(nodes, [_x()], [_y()]))
    # UINT8 as the network input is fine
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="in_cast", to=F)]
    assert _rules(_model(nodes, [_x(dtype=U8)], [_y()])) == []


# The rows of TensorRT 10.0's matrix (onnx-tensorrt docs/operators.md at 10.0) whose restrictions 10.15 relaxed
TRT10_0_ROWS = """TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20.
| Shape | Y | FP32, FP16, BF16, INT32, INT64, BOOL |
| Slice | Y | FP32, FP16, BF16, INT32, INT64, BOOL | `axes` must be an initializer |
| Pad | Y | FP32, FP16, BF16, INT32, INT64 | `axes` must be an initializer |
| ReduceSum | Y | FP32, FP16, BF16, INT32, INT64 | `axes` must be an initializer |
| CumSum | Y | FP32, FP16, BF16 | `axis` must be an initializer |
"""


def _dynamic_axes_graph():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Slice", ["s", "st", "en", "s"], ["sl"], name="slice"),
             helper.make_node("ReduceSum", ["x", "sl"], ["y"], name="rsum")]
    return _model(nodes, [_x()], [_y()], [_const("st", [0]), _const("en", [1])], opset=18)


def test_constant_input_rules_follow_the_matrix_version():
    model = _dynamic_axes_graph()
    # 10.15: Slice's axes may be computed at run time; ReduceSum's axes must still be an initializer
    assert set(_rules(model)) == {("rsum", "constant-input")}
    # 10.0 required both
    old = parse_matrix(TRT10_0_ROWS)
    assert old.version == "10.0" and old.opset_range == (9, 20)
    assert {(v.node, v.rule) for v in check_model(model, old)} == {("slice", "constant-input"), ("rsum", "constant-input")}


def test_topk_k_may_be_computed_since_10_15_but_stays_below_3840():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["k"], name="k_from_shape", axis=0),
             helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk", axis=-1)]
    model = _model(nodes, [_x(shape=("N", 5000))], [_y(), _y("i", I64)], [_const("one", [1])])
    assert _rules(model) == []


def test_topk_limits():
    big = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk", axis=-1)],
                 [_x(shape=("N", 5000))], [_y(), _y("i", I64)], [_const("k", [4000])])
    assert _rules(big) == [("topk", "topk")]
    unsorted = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk", sorted=0)],
                      [_x(shape=("N", 5000))], [_y(), _y("i", I64)], [_const("k", [100])])
    assert _rules(unsorted) == [("topk", "topk")]
    ok = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk")],
                [_x(shape=("N", 5000))], [_y(), _y("i", I64)], [_const("k", [1000])])
    assert _rules(ok) == []


def test_loop_with_dynamic_scan_output_and_shape_changing_state():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Concat", ["v_in", "v_in"], ["v_out"], axis=0),
         helper.make_node("Identity", ["v_in"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond_in", B, []),
         helper.make_tensor_value_info("v_in", F, [2])],
        [helper.make_tensor_value_info("cond_out", B, []), helper.make_tensor_value_info("v_out", F, [4]),
         helper.make_tensor_value_info("scan", F, [2])],
    )
    nodes = [helper.make_node("Shape", ["x"], ["trip"], name="trip"),  # not a constant
             helper.make_node("Loop", ["trip_s", "", "v0"], ["v_final", "scans"], name="loop", body=body)]
    model = _model(nodes, [_x(shape=["N"]), helper.make_tensor_value_info("trip_s", I64, []),
                           helper.make_tensor_value_info("v0", F, [2])],
                   [_y("v_final"), _y("scans")])
    messages = [v.message for v in check_model(model) if v.node == "loop"]
    assert any("scan output" in m for m in messages) and any("changes shape" in m for m in messages)


def test_if_branches_must_match_rank_and_differ_in_names():
    then_b = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "then", [],
                               [helper.make_tensor_value_info("out", F, [2, 2])])
    else_b = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "else", [],
                               [helper.make_tensor_value_info("out", F, [4])])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_b, else_branch=else_b)
    model = _model([node], [helper.make_tensor_value_info("c", B, []), _x()], [_y()])
    msgs = [v.message for v in check_model(model) if v.rule == "if"]
    assert any("names must differ" in m for m in msgs) and any("ranks 2 and 1" in m for m in msgs)


def test_pooling_resize_and_attribute_rules():
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], name="pool", kernel_shape=[2, 2], dilations=[2, 2]),
             helper.make_node("Resize", ["p", "", "sc"], ["r"], name="resize", mode="cubic"),
             helper.make_node("ScatterND", ["r", "ind", "upd"], ["y"], name="scatter", reduction="add")]
    model = _model(nodes, [_x()], [_y(), _y("idx", I64)],
                   [numpy_helper.from_array(np.ones(4, np.float32), "sc"), _const("ind", [[0]]),
                    numpy_helper.from_array(np.zeros((1, 3, 4, 4), np.float32), "upd")])
    rules = _rules(model)
    assert rules.count(("pool", "pooling")) == 2  # dilations and the Indices output
    assert ("resize", "resize") in rules and ("scatter", "attribute") in rules
    q = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], name="q")],
               [_x()], [_y(dtype=TensorProto.INT8)],
               [numpy_helper.from_array(np.float32(0.1).reshape(()), "s"),
                numpy_helper.from_array(np.int8(3).reshape(()), "zp")])
    assert _rules(q) == [("q", "attribute")]


def test_dynamic_spatial_input_and_the_one_line_error():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_x(shape=("N", 3, "H", "W"))], [_y()])
    assert _rules(model) == [("x", "static-shape"), ("x", "static-shape")]
    with pytest.raises(ExportError) as err:
        assert_tensorrt_compatible(model, "student.onnx")
    text = str(err.value)
    assert "\n" not in text and text.startswith("student.onnx: not loadable by TensorRT 10.15")
    assert "node 'x' (graph input) breaks TensorRT 10.15 rule 'static-shape': dimension 2 is dynamic ('H')" in text
