"""export/ort_fusion.py: DequantizeLinear -> MatMul -> bias Add as one com.microsoft MatMulIntegerToFloat,
run by the real ONNX Runtime against the same graph unfused, on random data of awkward sizes."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qdetr_deploy.export.graph import GraphBuilder
from qdetr_deploy.export.ort_fusion import fuse_matmul_bias

K, N = 37, 19


def _linear(weight_type: int, extra_reader: bool = False) -> tuple[GraphBuilder, str]:
    """x [5,3,K] -> Q (uint8, zero point 7) -> DQ -> MatMul(DQ(weight [K,N], per column)) -> Add(bias
    [1,N])."""
    rng = np.random.default_rng(0)
    g = GraphBuilder(21)
    s, z = g.const("x.scale", np.float32(0.031)), g.const_int("x.zp", np.array(7), TensorProto.UINT8)
    codes = g.node("QuantizeLinear", ["x", s, z], "x/Q")
    x = g.node("DequantizeLinear", [codes, s, z], "x/DQ")
    lo, hi = (-8, 7) if weight_type == TensorProto.INT4 else (-128, 127)
    w = g.const_int("w", rng.integers(lo, hi + 1, (K, N)), weight_type)
    w_dq = g.node("DequantizeLinear", [w, g.const("w.scale", rng.uniform(1e-3, 2e-2, N).astype(np.float32)),
                                       g.const_int("w.zp", np.zeros(N), weight_type)], "w/DQ", axis=1)
    y = g.node("MatMul", [x, w_dq], "lin/MatMul")
    out = g.node("Add", [y, g.const("lin.bias", rng.normal(0, 1, (1, N)).astype(np.float32))], "lin/Add")
    if extra_reader:
        out = g.node("Add", [out, y], "twice")
    return g, out


def _run(g: GraphBuilder, out: str, x: np.ndarray) -> np.ndarray:
    proto = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                    [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_matmul_bias_becomes_one_integer_kernel_with_the_same_output() -> None:
    g, out = _linear(TensorProto.INT8)
    x = np.random.default_rng(1).normal(1.0, 3.0, (5, 3, K)).astype(np.float32)
    expected = _run(copy.deepcopy(g), out, x)
    assert fuse_matmul_bias(g) == 1
    ops = [n.op_type for n in g.nodes]
    assert ops == ["QuantizeLinear", "MatMulIntegerToFloat"], ops
    (mm,) = [n for n in g.nodes if n.op_type == "MatMulIntegerToFloat"]
    assert mm.domain == "com.microsoft" and mm.name == "lin/MatMul" and len(mm.input) == 7
    assert "lin.bias" not in {t.name for t in g.initializers}  # the [1,N] bias was replaced by its 1-D copy
    np.testing.assert_array_equal(_run(g, out, x), expected)


@pytest.mark.parametrize(("weight_type", "extra_reader"),
                         [(TensorProto.INT4, False), (TensorProto.INT8, True)])
def test_unfusable_matmuls_are_left_alone(weight_type: int, extra_reader: bool) -> None:
    """An INT4 weight (the kernel takes 8-bit ones) or a MatMul output read by more than the bias Add."""
    g, _ = _linear(weight_type, extra_reader)
    before = [n.op_type for n in g.nodes]
    assert fuse_matmul_bias(g) == 0
    assert [n.op_type for n in g.nodes] == before
