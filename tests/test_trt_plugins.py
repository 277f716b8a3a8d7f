"""4-bit TensorRT plugins without TensorRT: the ONNX rewrite (weights, steps, zero-point correction, bias,
and the layer's arithmetic against the integer references), the fused AOT kernel (interpreter, and PTX for
sm_90 / sm_87), and registration, which needs TensorRT."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kernels.gemm_w4a8 import w4a8_linear_ref
from kernels.quantize_act import quantize_act_ref
from kernels.trt_plugins import (
    DOMAIN,
    NOT_INSTALLED,
    OP_TYPE,
    plugin_support,
    register_plugins,
    rewrite_int4_linears,
)
from kernels.trt_plugins.onnx_rewrite import pack_plugin_weight, unpack_plugin_weight
from qdetr_deploy.checkpoints import save_checkpoint
from qdetr_deploy.engines.tensorrt import int4_plugin_registrar
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.onnx_export import export_onnx
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.quant import QuantConfig, calibrate, quantize

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
H, W = 64, 96


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A calibrated 4-4-8 detr_tiny exported for TensorRT (zero-point-0 int8 Q/DQ) and onnxruntime."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits("4-4-8"))
    calibrate(model, [torch.randn(2, 3, H, W) for _ in range(2)], progress=False)
    ckpt = save_checkpoint(model.eval(), d / "q.safetensors")
    return {t: export_onnx(ckpt, d / f"{t}.onnx", target=t, image_size=(H, W)).path
            for t in ("tensorrt", "onnxruntime")}


def _int4_matmuls(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """MatMuls whose weight is a 4-bit initializer through DequantizeLinear (INT4, or INT8 with codes in
    [-8, 7]: the tensorrt export's int8 container), by node name."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for n in model.graph.node:
        dq = producer.get(n.input[1]) if n.op_type == "MatMul" else None
        w = inits.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if w is not None and w.data_type in (TensorProto.INT4, TensorProto.INT8):
            codes = numpy_helper.to_array(w).astype(np.int8)
            if codes.min() >= -8 and codes.max() <= 7:
                found[n.name] = n
    return found


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_rewrite_puts_the_original_weights_into_plugin_nodes(exported, target):
    original = onnx.load(str(exported[target]))
    model = onnx.load(str(exported[target]))
    report = rewrite_int4_linears(model)
    layers = _int4_matmuls(original)
    assert len(layers) == 32 and sorted(report.plugins) == sorted(f"{n}/{OP_TYPE}" for n in layers)
    # layer1..3 of the tiny backbone: INT4 in the onnxruntime export, INT8 already in the tensorrt one
    assert not report.skipped and len(report.int8_convs) == (0 if target == "tensorrt" else 3)
    assert not _int4_matmuls(model)
    assert not any(t.data_type == TensorProto.INT4 for t in model.graph.initializer)
    assert any(o.domain == DOMAIN for o in model.opset_import)
    onnx.checker.check_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    new_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in original.graph.node for o in n.output}
    plugins = {n.name: n for n in model.graph.node if n.op_type == OP_TYPE}
    for name, mm in layers.items():
        node = plugins[f"{name}/{OP_TYPE}"]
        assert node.domain == DOMAIN and len(node.output) == 3
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w_dq = producer[mm.input[1]]
        codes = inits[w_dq.input[0]].astype(np.int8).T  # [K,N] -> [N,K]
        x, w_words, w_step, zcorr, bias = node.input
        assert new_inits[w_words].dtype == np.int32
        assert np.array_equal(unpack_plugin_weight(new_inits[w_words], attrs["k"]), codes)
        assert np.array_equal(new_inits[w_step], inits[w_dq.input[1]].astype(np.float32))
        assert np.array_equal(new_inits[zcorr], attrs["x_zero_point"] * codes.astype(np.int64).sum(1))
        add = next(n for n in original.graph.node if mm.output[0] in n.input)
        assert add.op_type == "Add" and node.output[0] == add.output[0]
        assert np.array_equal(new_inits[bias], inits[add.input[1]].reshape(-1))
        q = producer[producer[mm.input[0]].input[0]]
        assert q.op_type == "QuantizeLinear" and x == q.input[0]
        assert np.float32(attrs["x_step"]) == inits[q.input[1]].astype(np.float32).reshape(-1)[0]
        assert -128 <= attrs["qmin"] <= attrs["x_zero_point"] + 15 and attrs["qmax"] <= 127


def _plugin_ref(node: onnx.NodeProto, inits: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the plugin computes, from its inputs and attributes, with the integer reference kernels."""
    a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    k = a["k"]
    packed = inits[node.input[1]].view(np.uint8)[:, : (k + 1) // 2]
    codes = quantize_act_ref(torch.from_numpy(x), a["x_step"], a["x_zero_point"], a["qmin"], a["qmax"])
    t = {i: torch.from_numpy(np.array(inits[node.input[i]])) for i in (2, 3, 4)}
    return w4a8_linear_ref(codes, torch.from_numpy(np.array(packed)), k, t[2], t[3],
                           a["x_step"], t[4]).numpy()


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_plugin_arithmetic_matches_the_original_layers(exported, target):
    """Expose each plugin's input and output in the ORIGINAL graph (onnxruntime), recompute the output
    from the plugin node alone: the same layer up to float rounding."""
    model = onnx.load(str(exported[target]))
    rewritten = onnx.load(str(exported[target]))
    rewrite_int4_linears(rewritten)
    plugins = [n for n in rewritten.graph.node if n.op_type == OP_TYPE]
    names = sorted({n.input[0] for n in plugins} | {n.output[0] for n in plugins})
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x})))
    inits = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    worst = 0.0
    for node in plugins:
        want = values[node.output[0]]
        got = _plugin_ref(node, inits, values[node.input[0]])
        worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6)))
    print(f"{target}: worst relative difference of a plugin layer {worst:.3g}")
    assert worst < 1e-5


def test_plugin_weight_packing_round_trip():
    rng = np.random.default_rng(0)
    for k in (1, 7, 8, 9, 96, 130):
        codes = rng.integers(-8, 8, (5, k)).astype(np.int8)
        words = pack_plugin_weight(codes)
        assert words.dtype == np.int32 and words.shape == (5, -(-((k + 1) // 2) // 4))
        assert np.array_equal(unpack_plugin_weight(words, k), codes)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: test_register_plugins covers registration")
def test_registration_without_tensorrt(exported, tmp_path):
    assert plugin_support() == (None, NOT_INSTALLED)
    assert int4_plugin_registrar() is register_plugins  # engines/tensorrt.py finds it
    with pytest.raises(QDetrError, match="TensorRT is not installed"):
        register_plugins()
    from qdetr_deploy.engines.tensorrt import build_trt_engine

    with pytest.raises(QDetrError, match="TensorRT is not installed"):
        build_trt_engine(exported["tensorrt"], tmp_path / "m.engine", bits=4)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed")
def test_register_plugins():
    form = register_plugins()
    assert form in ("qdp-aot", "qdp", "v3") and register_plugins() == form


def _run(script: str, interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fused_kernel_bit_exact_in_interpreter():
    """The AOT plugin's fused kernel equals quantize_act_ref + w4a8_linear_ref bit for bit."""
    _run("""
        import torch
        from kernels.gemm_w4a8 import w4a8_linear_ref
        from kernels.packing import pack_int4, zero_point_correction
        from kernels.quantize_act import quantize_act_ref
        from kernels.trt_plugins.fused import w4a8_fused_linear
        from kernels.trt_plugins.onnx_rewrite import pack_plugin_weight
        g = torch.Generator().manual_seed(0)
        cases = [(5, 70, 96, 3, -8, 7), (33, 64, 130, -119, -128, 127), (1, 9, 7, 2, 0, 15)]
        for m, n, k, z, lo, hi in cases:
            x = torch.randn(2, m, k, generator=g) * 2
            codes = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
            words = torch.from_numpy(pack_plugin_weight(codes.numpy()))
            ws, b = torch.rand(n, generator=g) * 0.1 + 0.01, torch.randn(n, generator=g)
            zc = zero_point_correction(codes, z)
            got = w4a8_fused_linear(x, words, k, ws, zc, b, 0.173, z, lo, hi)
            codes_x = quantize_act_ref(x, 0.173, z, lo, hi)
            want = w4a8_linear_ref(codes_x, pack_int4(codes), k, ws, zc, 0.173, b)
            assert got.shape == (2, m, n) and torch.equal(got, want), (m, n, k)
        """, interpret=True)


def test_fused_kernel_compiles_for_hopper_and_orin():
    """PTX for sm_90 and sm_87: int8 MMA, correctly rounded division, no FMA contraction, under 48 KB of
    shared memory, and at most HIDDEN_OUTPUTS parameters beyond the plugin's (inputs, scalars, output)."""
    out = _run("""
        import re
        from kernels.trt_plugins.fused import HIDDEN_OUTPUTS, compile_w4a8_fused, fused_signature
        for ft in ("fp16", "fp32"):
            for cap in (90, 87):
                c = compile_w4a8_fused(ft, cap)
                ptx = c.asm["ptx"]
                params = re.search(r"\\.entry\\s+\\w+\\s*\\(([^)]*)\\)", ptx).group(1).count(".param")
                assert 0 <= params - len(fused_signature(ft)) <= HIDDEN_OUTPUTS, params
                assert re.search(r"mma[\\w.]*\\.s32\\.s8\\.s8", ptx) and "div.rn.f32" in ptx, cap
                assert "fma.rn.f32" not in ptx and c.metadata.shared <= 48 * 1024, cap
                print(ft, cap, params, c.metadata.shared)
        """, interpret=False)
    assert out.count("\n") == 4
