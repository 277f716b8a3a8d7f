"""The TensorRT lint, rule by rule: each test builds a small graph that breaks one rule (and one that keeps
it), for the TensorRT versions the rule depends on. Pure onnx: no TensorRT needed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.trt_lint import lint_tensorrt, opset_range

F = TensorProto.FLOAT


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = 20,
           inputs: tuple[str, ...] = ("x",), output: str = "y") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, F, None) for i in inputs],
                              [helper.make_tensor_value_info(output, F, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("qdetr", 1)])


def _init(name: str, value: np.ndarray, dtype: int | None = None) -> onnx.TensorProto:
    if dtype in (TensorProto.INT4, TensorProto.FLOAT8E4M3FN):
        return helper.make_tensor(name, dtype, list(np.shape(value)), np.asarray(value).reshape(-1).tolist())
    return numpy_helper.from_array(np.asarray(value), name)


def _qdq(x: str, out: str, scale: str, zp: str | None, tag: str, **attrs) -> list[onnx.NodeProto]:
    ins = [x, scale] + ([zp] if zp else [])
    return [helper.make_node("QuantizeLinear", ins, [f"{tag}_q"], name=f"{tag}/Q", **attrs),
            helper.make_node("DequantizeLinear", [f"{tag}_q", *ins[1:]], [out], name=f"{tag}/DQ", **attrs)]


def _rules(model: onnx.ModelProto, version: str = "10.3", cc: tuple[int, int] | None = None) -> set[str]:
    return {v.rule for v in lint_tensorrt(model, version, cc)}


def _int8_act(tag: str = "a", zp_value: int = 0, scale=np.float32(0.1)) -> tuple[list, list]:
    inits = [_init(f"{tag}.s", np.asarray(scale, np.float32)), _init(f"{tag}.z", np.int8(zp_value))]
    return _qdq("x", "y", f"{tag}.s", f"{tag}.z", tag), inits


def test_a_clean_int8_qdq_passes_every_version() -> None:
    nodes, inits = _int8_act()
    for version in ("10.3", "10.9", "10.16", "11.1"):
        assert lint_tensorrt(_model(nodes, inits), version) == []


def test_below_10_3_is_refused_in_one_line() -> None:
    nodes, inits = _int8_act()
    with pytest.raises(QDetrError, match=r"^TensorRT 8\.6 is not supported: TensorRT 10\.3 or newer"):
        lint_tensorrt(_model(nodes, inits), "8.6")


def test_opset_range_by_version() -> None:
    nodes, inits = _int8_act()
    assert opset_range("10.3") == (9, 20) and opset_range("10.15") == (9, 24)
    assert "opset" in _rules(_model(nodes, inits, opset=21), "10.3")
    assert "opset" not in _rules(_model(nodes, inits, opset=21), "10.16")
    assert "opset" in _rules(_model(nodes, inits, opset=8), "10.16")


def test_operator_list_by_version_and_domain() -> None:
    rms = helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="rms")
    model = _model([rms], [_init("g", np.ones(4, np.float32))], opset=23)
    assert "unsupported-op" in _rules(model, "10.3")
    assert "unsupported-op" not in _rules(model, "10.15")
    foreign = _model([helper.make_node("Foo", ["x"], ["y"], name="foo", domain="com.x")], [])
    assert [v.node for v in lint_tensorrt(foreign) if v.rule == "unsupported-op"] == ["foo"]
    assert "unsupported-op" in _rules(_model([helper.make_node("Bar", ["x"], ["y"], name="bar")], []))


def test_reduce_axes_constant_from_initializer_or_constant_node() -> None:
    reduce = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")
    assert "constant-input" in _rules(_model([reduce], [], inputs=("x", "axes")))
    const = helper.make_node("Constant", [], ["axes"], name="c", value=_init("v", np.array([1], np.int64)))
    assert _rules(_model([const, reduce], [])) == set()


def test_clip_bounds_as_tensors_are_no_violation() -> None:
    clip = helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clip")
    assert lint_tensorrt(_model([clip], [], inputs=("x", "lo", "hi"))) == []


def test_zero_point_rules() -> None:
    nodes, inits = _int8_act(zp_value=3)
    assert "zero-point" in _rules(_model(nodes, inits))
    zero = helper.make_node("Constant", [], ["a.z"], name="zc", value=_init("v", np.int8(0)))
    nodes, inits = _int8_act()
    assert lint_tensorrt(_model([zero, *nodes], inits[:1])) == []  # zero point from a Constant node
    assert "zero-point" in _rules(_model(nodes, inits[:1], inputs=("x", "a.z")))  # not a constant


def test_scale_rules() -> None:
    nodes, inits = _int8_act(scale=np.float32(-0.1))
    assert "scale" in _rules(_model(nodes, inits))
    nodes, inits = _int8_act()
    assert "scale" in _rules(_model(nodes, inits[1:], inputs=("x", "a.s")))
    nodes, inits = _int8_act(scale=np.full(4, 0.1, np.float32))
    assert "per-channel-activation" in _rules(_model(nodes, inits))


def test_activation_dtype_and_fp8_by_compute_capability() -> None:
    inits = [_init("s", np.float32(0.1)), _init("z", np.uint8(0))]
    assert "qdq-dtype" in _rules(_model(_qdq("x", "y", "s", "z", "a"), inits))
    inits = [_init("s", np.float32(0.1)), _init("z", np.zeros(()), TensorProto.FLOAT8E4M3FN)]
    fp8 = _model(_qdq("x", "y", "s", "z", "a"), inits)
    assert "fp8" in _rules(fp8, "10.3", (8, 7))  # Orin
    assert _rules(fp8, "10.3", (8, 9)) == set() and _rules(fp8, "10.3") == set()


def _gemm(weight: onnx.TensorProto, scale: np.ndarray, quantized_input: bool, opset: int = 21,
          **dq_attrs) -> onnx.ModelProto:
    """x [.., K] -> [Q/DQ int8] -> MatMul <- DequantizeLinear(weight, scale)."""
    nodes, inits = [], [weight, _init("w.s", scale.astype(np.float32))]
    x = "x"
    if quantized_input:
        inits += [_init("a.s", np.float32(0.1)), _init("a.z", np.int8(0))]
        nodes += _qdq("x", "xq", "a.s", "a.z", "a")
        x = "xq"
    nodes += [helper.make_node("DequantizeLinear", ["w", "w.s"], ["wf"], name="w/DQ", **dq_attrs),
              helper.make_node("MatMul", [x, "wf"], ["y"], name="mm")]
    return _model(nodes, inits, opset=opset)


def test_int4_only_as_weight_only_block_quantized_gemm_weights() -> None:
    codes = np.random.default_rng(0).integers(-8, 8, (64, 8))
    w4 = _init("w", codes, TensorProto.INT4)
    blocks = np.full((2, 8), 0.05)
    good = _gemm(w4, blocks, quantized_input=False, axis=0, block_size=32)
    assert lint_tensorrt(good, "10.16") == []
    assert _rules(good, "10.3") == {"opset"}  # INT4 needs opset 21, beyond 10.3's documented range
    per_channel = _gemm(w4, np.full(8, 0.05), quantized_input=False, axis=1)
    assert "int4-placement" in _rules(per_channel, "10.16")  # not block-quantized
    behind_int8 = _gemm(w4, blocks, quantized_input=True, axis=0, block_size=32)
    assert "int4-placement" in _rules(behind_int8, "10.16")  # NVIDIA/TensorRT#4262
    conv = _model([helper.make_node("DequantizeLinear", ["w", "w.s"], ["wf"], name="w/DQ", axis=0),
                   helper.make_node("Conv", ["x", "wf"], ["y"], name="conv")],
                  [_init("w", np.zeros((4, 2, 1, 1), np.int64), TensorProto.INT4),
                   _init("w.s", np.full(4, 0.1, np.float32))], opset=21)
    assert "int4-placement" in _rules(conv, "10.16")
    act = _model(_qdq("x", "y", "s", "z", "a"), [_init("s", np.float32(0.1)),
                                                  _init("z", np.zeros(()), TensorProto.INT4)], opset=21)
    assert {"int4-placement", "qdq-dtype"} <= _rules(act, "10.16")


def test_block_quantization_only_for_int4() -> None:
    w8 = _init("w", np.zeros((64, 8), np.int8))
    model = _gemm(w8, np.full((2, 8), 0.05), quantized_input=False, axis=0, block_size=32)
    assert "block-quantization" in _rules(model, "10.16")


def _plugin(aot: int | None, drop: str | None = None) -> onnx.ModelProto:
    attrs = {"k": 8, "x_step": 0.1, "x_zero_point": 0, "qmin": -8, "qmax": 7, "plugin_namespace": "qdetr"}
    if aot is not None:
        attrs["aot"] = aot
    attrs.pop(drop, None)
    node = helper.make_node("W4A8Linear", ["x", "w", "s", "z", "b"], ["y", "t0", "t1"], name="p",
                            domain="qdetr", **attrs)
    return _model([node], [], inputs=("x", "w", "s", "z", "b"))


def test_plugin_node_attributes_by_version() -> None:
    assert lint_tensorrt(_plugin(None), "10.3") == [] and lint_tensorrt(_plugin(None), "10.8") == []
    assert lint_tensorrt(_plugin(1), "10.9") == [] and lint_tensorrt(_plugin(1), "10.16") == []
    assert _rules(_plugin(None), "10.16") == {"plugin-aot"}  # "has both AOT and JIT implementations"
    assert _rules(_plugin(1), "10.3") == {"plugin-aot"}
    assert _rules(_plugin(None, drop="x_step"), "10.3") == {"plugin"}
