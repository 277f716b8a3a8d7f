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

from kernels.errors import KernelError
from kernels.gemm_w4a8 import w4a8_linear_ref
from kernels.quantize_act import quantize_act_ref
from kernels.trt_plugins import (
    DOMAIN,
    NOT_INSTALLED,
    OP_TYPE,
    plugin_form_for,
    plugin_support,
    register_plugins,
    rewrite_int4_linears,
    triton_problem,
)
from kernels.trt_plugins.onnx_rewrite import pack_plugin_weight, unpack_plugin_weight
from qdetr_deploy.checkpoints import save_checkpoint
from qdetr_deploy.engines.tensorrt import int4_plugin_registrar, network_graph
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.onnx_export import export_onnx
from qdetr_deploy.export.trt_lint import lint_tensorrt
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.quant import QuantConfig, calibrate, quantize

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
H, W = 64, 96


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A calibrated 4-4-8 detr_tiny exported for TensorRT (zero-point-0 int8 Q/DQ) and for onnxruntime with
    the int4 container (onnxruntime's default is int8)."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits("4-4-8"))
    calibrate(model, [torch.randn(2, 3, H, W) for _ in range(2)], progress=False)
    ckpt = save_checkpoint(model.eval(), d / "q.safetensors")
    return {t: export_onnx(ckpt, d / f"{t}.onnx", target=t, image_size=(H, W), weight_container="int4").path
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
    # 36 quantized linears, less the first decoder layer's self-attention (4: a constant block)
    assert len(layers) == 28 and sorted(report.plugins) == sorted(f"{n}/{OP_TYPE}" for n in layers)
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
    with pytest.raises(KernelError, match="TensorRT is not installed"):  # the kernels' own error
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


# --- the rewritten graph per TensorRT version, the definitions' annotations (static) ---------------------

@pytest.mark.parametrize("version", ["10.3", "10.8", "10.16"])
def test_rewritten_graph_for_each_tensorrt_version(exported, version):
    """The graph build-engine --bits 4 parses: plugin nodes with the attributes that version needs (aot
    from 10.9 only), and the whole graph passes that version's lint."""
    form = plugin_form_for(version)
    assert form == {"10.3": "v3", "10.8": "qdp", "10.16": "qdp-aot"}[version]
    model = network_graph(exported["tensorrt"], 4, form)
    plugins = [n for n in model.graph.node if n.op_type == OP_TYPE]
    assert len(plugins) == 28  # the first decoder layer's self-attention is a constant block
    kinds = {"k": "INT", "x_step": "FLOAT", "x_zero_point": "INT", "qmin": "INT", "qmax": "INT",
             "plugin_namespace": "STRING"}
    for node in plugins:
        attrs = {a.name: a for a in node.attribute}
        assert node.domain == DOMAIN and attrs["plugin_namespace"].s == b"qdetr"
        assert {k: onnx.AttributeProto.AttributeType.Name(attrs[k].type) for k in kinds} == kinds
        assert ("aot" in attrs) == (form == "qdp-aot") and (form != "qdp-aot" or attrs["aot"].i == 1)
    assert lint_tensorrt(model, version) == []
    other = "10.16" if version == "10.3" else "10.3"
    assert {v.rule for v in lint_tensorrt(model, other)} == ({"plugin-aot"} if form != "qdp" else set())


def test_qdp_attributes_are_numpy_arrays():
    """tensorrt.plugin converts a builtin-annotated attribute with ``annotation(field.data)``, which NumPy 2
    refuses on a one-element array; the definitions annotate numpy.typing.NDArray[dtype] everywhere."""
    import ast
    import typing

    from kernels.trt_plugins import qdp

    dtypes = {"k": np.int32, "x_step": np.float32, "x_zero_point": np.int32, "qmin": np.int32,
              "qmax": np.int32}
    for name, ann in qdp.ATTR_TYPES.items():
        assert typing.get_origin(ann) is np.ndarray
        assert typing.get_args(typing.get_args(ann)[1])[0] is dtypes[name]
    tree = ast.parse(Path(qdp.__file__).read_text())
    decorated = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.decorator_list]
    assert sorted(ast.unparse(f.decorator_list[0].func) for f in decorated) == \
        ["trtp.aot_impl", "trtp.impl", "trtp.register"]
    for f in decorated:
        anns = {a.arg: ast.unparse(a.annotation) for a in f.args.args}
        assert {n: anns[n] for n in dtypes} == {n: "F32" if n == "x_step" else "I32" for n in dtypes}, f.name
    # what the creator hands the functions: field data cast to the annotated dtype (one element each)
    fields = {n: np.array([v]).astype(dtypes[n]) for n, v in
              {"k": 96, "x_step": 0.173, "x_zero_point": -3, "qmin": -8, "qmax": 7}.items()}
    attrs = qdp.attrs_of(**fields)
    assert attrs.k == 96 and attrs.x_step == float(np.float32(0.173)) and (attrs.qmin, attrs.qmax) == (-8, 7)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (not installable on this machine)")
def test_register_and_create_through_tensorrt():
    """Wherever tensorrt imports: register the plugin and create it from the fields the ONNX parser passes
    (INT32 / FLOAT32 one-element arrays), through the creator TensorRT's registry returns."""
    import tensorrt as trt

    if triton_problem():
        pytest.skip(triton_problem())
    form = register_plugins()
    creator = trt.get_plugin_registry().get_creator("W4A8Linear", "1", DOMAIN)
    assert creator is not None
    values = {"k": np.array([96], np.int32), "x_zero_point": np.array([0], np.int32),
              "qmin": np.array([-8], np.int32), "qmax": np.array([7], np.int32),
              "x_step": np.array([0.1], np.float32)}
    kinds = {np.dtype(np.int32): trt.PluginFieldType.INT32, np.dtype(np.float32): trt.PluginFieldType.FLOAT32}
    fc = trt.PluginFieldCollection([trt.PluginField(n, v, kinds[v.dtype]) for n, v in values.items()])
    if form == "v3":
        plugin = creator.create_plugin("W4A8Linear", fc, trt.TensorRTPhase.BUILD)
    else:
        request = getattr(trt, "QuickPluginCreationRequest", None)
        args = (request.STRICT_AOT,) if form == "qdp-aot" else ()
        plugin = creator.create_plugin("W4A8Linear", DOMAIN, fc, trt.TensorRTPhase.BUILD, *args)
    assert plugin is not None


# --- build-engine --bits 8: INT4 initializers made INT8 exactly, or refused ------------------------------

def _as_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tensorrt export with its 4-bit weights (and their zero points) in INT4 at opset 21: what
    --target tensorrt wrote before (INT4 convs, INT4 weights behind INT8 activations)."""
    model.opset_import[0].version = 21
    by_name = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        w = by_name.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or w.data_type != TensorProto.INT8 or np.abs(numpy_helper.to_array(w) + 0.5).max() > 8:
            continue
        for t in (w, by_name[n.input[2]]):
            codes = numpy_helper.to_array(t)
            t.CopyFrom(helper.make_tensor(t.name, TensorProto.INT4, codes.shape, codes.reshape(-1).tolist()))
    return model


def _run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})


def test_bits8_makes_int4_weights_int8_exactly(exported):
    from qdetr_deploy.engines.trt_graph import int4_to_int8

    original = onnx.load(str(exported["tensorrt"]))
    model = _as_int4(onnx.load(str(exported["tensorrt"])))
    assert {v.rule for v in lint_tensorrt(model, "10.16")} == {"int4-placement"}  # 31 such layers
    converted = int4_to_int8(model)
    assert len(converted) == 31 and not any(t.data_type == TensorProto.INT4 for t in model.graph.initializer)
    assert lint_tensorrt(model, "10.16") == []
    x = np.random.default_rng(1).standard_normal((1, 3, H, W)).astype(np.float32)
    for got, want in zip(_run_ort(model, x), _run_ort(original, x)):
        assert np.array_equal(got, want)


def test_bits8_refuses_what_has_no_exact_int8_form(exported, tmp_path):
    from qdetr_deploy.engines.trt_graph import int4_to_int8

    with pytest.raises(QDetrError) as e:  # the onnxruntime export quantizes activations to 4 bits
        int4_to_int8(onnx.load(str(exported["onnxruntime"])), exported["onnxruntime"])
    msg = str(e.value)
    assert "\n" not in msg and str(exported["onnxruntime"]) in msg and "--target tensorrt" in msg
    codes = np.random.default_rng(0).integers(-8, 8, (64, 8))
    w = helper.make_tensor("w", TensorProto.INT4, codes.shape, codes.reshape(-1).tolist())

    def blocked(scale: np.ndarray) -> onnx.ModelProto:
        nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=32),
                 helper.make_node("MatMul", ["x", "wf"], ["y"])]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "wf")]
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
        graph = helper.make_graph(nodes, "g", [x_info], outs,
                                  [w, numpy_helper.from_array(scale.astype(np.float32), "s")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    same = blocked(np.tile(np.linspace(0.01, 0.08, 8), (2, 1)))
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    want = ort.InferenceSession(same.SerializeToString()).run(None, {"x": x})
    int4_to_int8(same)
    got = ort.InferenceSession(same.SerializeToString()).run(None, {"x": x})
    assert np.array_equal(got[1], want[1])  # the dequantized weights: equal (the MatMul kernels differ)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(QDetrError, match="distinct block steps"):
        int4_to_int8(blocked(np.random.default_rng(3).uniform(0.01, 0.1, (2, 8))))


# --- TensorRT for real: the exporter's own outputs, int8 container and --bits 4 ---------------------------

@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (not installable on this machine)")
@pytest.mark.parametrize("bits", [8, 4])
def test_tensorrt_builds_the_tensorrt_export(exported, tmp_path, bits):
    """build-engine on the --target tensorrt export: --bits 8 (int8 container) and --bits 4 (plugins), run
    against ONNX Runtime on the same ONNX file."""
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    if bits == 4 and triton_problem():
        pytest.skip(triton_problem())
    from qdetr_deploy.engines import open_engine
    from qdetr_deploy.engines.tensorrt import build_trt_engine, read_trt_header

    out = build_trt_engine(exported["tensorrt"], tmp_path / f"w{bits}.engine", bits=bits)
    header = read_trt_header(out)
    assert header.build["bits"] == bits and (bits == 8) == (header.build["plugin_form"] is None)
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    sess = ort.InferenceSession(str(exported["tensorrt"]), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x})))
    got = open_engine(out).run(x)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=2e-2)  # float sums may flip a code
