"""ONNX export (qdetr_deploy/export): TensorRT lint, metadata, errors, and parity with the PyTorch model.

The tiny DETR has random weights (batch norms given random statistics) and is calibrated on random images.
Inputs are 64x64 and the check uses one batch of 2 images: the integer path is exact by construction, but
float accumulation order (PyTorch vs ONNX Runtime kernels) can put a quantizer input a few ulps across a
rounding boundary now and then, and in a random network one flipped code cascades; the more elements, the
likelier that is (see docs/BENCHMARKS.md "Export and ONNX Runtime (CPU)").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qdetr_deploy.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.export import onnx_export
from qdetr_deploy.export.check import check_onnx, random_images
from qdetr_deploy.export.folding import Ctx
from qdetr_deploy.export.graph import GraphBuilder
from qdetr_deploy.export.lower.layers import linear_as
from qdetr_deploy.export.onnx_export import build_onnx, export_onnx, save_onnx
from qdetr_deploy.export.trt_lint import lint_tensorrt
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.quant import QuantConfig, calibrate, quantize

BITS = ("2-2-8", "3-3-8", "4-4-8", "8-8-8")
SIZE = (64, 64)
MEASURED: dict[tuple[str, str], tuple[float, float, float]] = {}


def float_tiny(seed: int = 0) -> torch.nn.Module:
    """detr_tiny with random weights and random (valid) batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_detr(get_preset("detr_tiny", class_names=["circle", "square", "triangle"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def quantized_tiny(bits: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    model = quantize(float_tiny(seed), QuantConfig.from_bits(bits, **kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(2, 3, *SIZE, generator=gen) for _ in range(2)]
    return calibrate(model, batches, progress=False).eval()


def save_student(model: torch.nn.Module, path: Path) -> Path:
    return save_checkpoint(model, path, category_ids=[1, 2, 3],
                           meta={"stage": "quantized", "calibration": {"image_size": list(SIZE)}})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spin-waiting makes small ops 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("students")
    return {bits: save_student(quantized_tiny(bits), root / f"tiny-{bits}.safetensors") for bits in BITS}


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("bits", BITS)
def test_export_reproduces_pytorch(students: dict[str, Path], bits: str, target: str, tmp_path: Path) -> None:
    ckpt = load_checkpoint(students[bits])
    result = export_onnx(ckpt, tmp_path / "model.onnx", target=target, batch=2)
    report = check_onnx(result.path, ckpt.model, tolerance=1e-4)
    MEASURED[(bits, target)] = (report.max_prob_diff, report.max_box_diff, report.code_agreement)
    print(f"{bits} {target}: prob {report.max_prob_diff:.2e} box {report.max_box_diff:.2e} "
          f"codes {100 * report.code_agreement:.4f}% fallbacks {len(result.fallbacks)}")
    assert report.passed, report.table()
    assert report.max_prob_diff <= 1e-4 and report.max_box_diff <= 1e-4
    assert report.code_agreement >= 0.999 and report.codes_compared > 100_000
    model = onnx.load(str(result.path))
    int4 = [t.name for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    assert not int4  # onnxruntime's default container is int8; TensorRT: INT8 weights
    if target == "tensorrt":
        assert report.lint == [] and model.opset_import[0].version == 20  # TensorRT 10.3's last opset
        assert all(reason for _, reason in result.fallbacks)
    meta = json.loads(_props(result.path)["qdetr"])
    assert meta == json.loads(result.sidecar.read_text())
    assert meta["format"] == "qdetr-onnx/1" and meta["bits"] == bits and meta["target"] == target
    assert meta["input_size"] == list(SIZE) and meta["batch"] == 2 and not meta["dynamic_batch"]
    assert meta["class_names"] == ["circle", "square", "triangle"] and meta["category_ids"] == [1, 2, 3]
    assert meta["quant_config"]["w_bits"] == int(bits[0]) and meta["postprocess"]
    assert meta["source"] == {"path": str(students[bits]), "sha256": file_sha256(students[bits])}
    assert len(meta["mean"]) == len(meta["std"]) == 3


def test_node_names_follow_pytorch_modules(students: dict[str, Path]) -> None:
    model, ctx = build_onnx(load_checkpoint(students["4-4-8"]).model, SIZE)
    names = {n.name for n in model.graph.node}
    for expected in ("transformer.encoder.layers.0.linear1/MatMul",
                     "transformer.encoder.layers.0.linear1.act/QuantizeLinear",
                     "transformer.decoder.layers.1.self_attn.q_act/QuantizeLinear",
                     "backbone.0.body.conv1/Conv", "class_embed/MatMul"):
        assert expected in names
    assert not any(n.op_type == "LayerNormalization" and "Quantize" in n.input[0] for n in model.graph.node)
    # every ActQuantizer of detr_tiny but the 8 of the first decoder layer's self-attention, whose block
    # depends on no input and is a constant (lower/transformer.first_self_attention)
    assert len(ctx.g.acts) == 52
    assert not any(".decoder.layers.0.self_attn." in r.module for r in ctx.g.acts)
    assert "transformer.decoder.layers.0.self_attn_block" in {t.name for t in model.graph.initializer}


def test_int4_packing_matches_onnx_helper() -> None:
    codes = np.arange(-8, 7).reshape(3, 5)  # odd count: the last byte gets a zero high nibble
    g = GraphBuilder(21)
    g.const_int("w", codes, TensorProto.INT4)
    ref = helper.make_tensor("w", TensorProto.INT4, [3, 5], codes.reshape(-1).tolist())
    assert g.initializers[0].raw_data == ref.raw_data or g.initializers[0].raw_data == bytes(ref.int32_data)
    assert np.array_equal(onnx.numpy_helper.to_array(g.initializers[0]), onnx.numpy_helper.to_array(ref))


def test_float_checkpoint_exports_quant_free_graph(tmp_path: Path) -> None:
    model = float_tiny()
    path = save_checkpoint(model, tmp_path / "fp.safetensors")
    result = export_onnx(path, tmp_path / "fp.onnx", image_size=SIZE, batch=2, postprocess=False)
    proto = onnx.load(str(result.path))
    assert not any("Quantize" in n.op_type for n in proto.graph.node)
    assert [o.name for o in proto.graph.output] == ["pred_logits", "pred_boxes"]
    assert result.metadata["bits"] == "fp32" and result.metadata["quant_config"] is None
    report = check_onnx(result.path, model)
    assert report.passed and report.codes_compared == 0, report.table()


def test_dynamic_batch_opset17_int8_container(tmp_path: Path) -> None:
    model = quantized_tiny("4-4-8", seed=3)
    path = save_student(model, tmp_path / "s.safetensors")
    result = export_onnx(path, tmp_path / "dyn.onnx", opset=17, dynamic_batch=True, weight_container="int8")
    proto = onnx.load(str(result.path))
    assert proto.opset_import[0].version == 17
    assert not any(t.data_type == TensorProto.INT4 for t in proto.graph.initializer)
    assert result.metadata["dynamic_batch"] and result.metadata["batch"] is None
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": random_images(3, SIZE)})
    assert out[0].shape == (3, 10) and out[1].dtype == np.int64 and out[2].shape == (3, 10, 4)
    assert check_onnx(result.path, model).passed


def test_int8_container_runs_integer_kernels(tmp_path: Path) -> None:
    """onnxruntime: every quantized transformer MatMul becomes an integer kernel."""
    kernels = pytest.importorskip("qdetr_deploy.engines.onnxruntime")
    model = quantized_tiny("4-4-8", seed=1)
    proto, _ = build_onnx(model, SIZE, weight_container="int8")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    report = kernels.integer_kernel_report(tmp_path / "opt.onnx")
    integer = {r["node"] for r in report if r["integer"]}
    print(kernels.format_kernel_report(report))
    for i in range(2):
        for proj in ("query_proj", "key_proj", "value_proj", "out_proj"):
            assert f"transformer.encoder.layers.{i}.self_attn.{proj}/MatMul" in integer
        assert f"transformer.encoder.layers.{i}.linear1/MatMul" in integer
        assert f"transformer.decoder.layers.{i}.multihead_attn/scores/MatMul" in integer
    assert len(integer) >= 40


def test_per_channel_steps_onnxruntime_exact_tensorrt_fallback(tmp_path: Path) -> None:
    model = quantized_tiny("4-4-8", seed=2, act_granularity="channel")
    path = save_student(model, tmp_path / "ch.safetensors")
    ort_result = export_onnx(path, tmp_path / "ort.onnx", batch=2)
    # convs keep per-axis Q/DQ (4-bit codes in the default int8 container: with a Max/Min clip); MatMul
    # inputs fall back (onnxruntime's MatMulIntegerToFloat limitation)
    assert all(name.startswith("transformer.") for name, _ in ort_result.fallbacks)
    modes = ort_result.act_modes
    assert modes.get("qdq", 0) + modes.get("clip+qdq", 0) == 4, modes
    assert check_onnx(ort_result.path, model).passed
    trt = export_onnx(path, tmp_path / "trt.onnx", target="tensorrt", batch=2)
    assert trt.fallbacks and all("per-channel" in r for _, r in trt.fallbacks)
    report = check_onnx(trt.path, model)
    assert report.passed and report.lint == [], report.table()


def test_trt_lint_flags_violations() -> None:
    model = quantized_tiny("4-4-8", seed=4, act_granularity="channel")
    proto, _ = build_onnx(model, SIZE, target="onnxruntime")
    rules = {v.rule for v in lint_tensorrt(proto)}
    assert {"zero-point", "qdq-dtype", "per-channel-activation"} <= rules
    proto.opset_import[0].version = 8  # TensorRT 10.x parsers start at opset 9
    proto.graph.node.append(helper.make_node("Foo", ["a"], ["b"], name="weird", domain="com.x"))
    found = lint_tensorrt(proto)
    assert any(v.rule == "opset" for v in found)
    assert any(v.node == "weird" and v.rule == "unsupported-op" for v in found)


def test_tensorrt_int4_only_for_weight_only_gemms() -> None:
    """A <= 4-bit linear with a float input is TensorRT's weight-only case: INT4, block-quantized, exactly
    the per-channel values (opset 21: TensorRT 10.15+); with a quantized input it stays INT8."""
    model = quantized_tiny("4-4-8", seed=6)
    lin = model.transformer.encoder.layers[0].linear1
    ctx = Ctx(GraphBuilder(21), "tensorrt", "int4")
    out = linear_as(ctx, "x", lin, "lin")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, lin.in_features])
    proto = ctx.g.model([x], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    assert not any(t.data_type == TensorProto.INT4 for t in proto.graph.initializer)
    lin.act = None  # weight-only: the activation stays float
    ctx = Ctx(GraphBuilder(21), "tensorrt", "int4")
    out = linear_as(ctx, "x", lin, "lin")
    proto = ctx.g.model([x], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs["axis"] == 0 and attrs["block_size"] >= 16 and lin.in_features % attrs["block_size"] == 0
    assert lint_tensorrt(proto, "10.16") == []
    codes, step, _ = lin.weight_qparams()
    xs = torch.randn(3, lin.in_features)
    with torch.no_grad():
        want = torch.nn.functional.linear(xs, codes * step.reshape(-1, 1), lin.bias).numpy()
    got = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": xs.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_external_data_for_large_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized_tiny("4-4-8", seed=5)
    path = save_student(model, tmp_path / "s.safetensors")
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    result = export_onnx(path, tmp_path / "big.onnx", batch=2)
    assert (tmp_path / "big.onnx.data").is_file()
    assert check_onnx(result.path, model).passed
    assert not list(tmp_path.glob(".*tmp"))


# --- bad input: exit 2, one line, nothing written -----------------------------------------------------------

def _bad_bits_checkpoint(student: Path, out: Path) -> Path:
    with safe_open(str(student), framework="pt") as f:
        header = dict(f.metadata())
    q = json.loads(header["quant_config"])
    q["w_bits"] = 5
    header["quant_config"] = json.dumps(q)
    save_file(load_file(str(student)), str(out), metadata=header)
    return out


def _foreign_checkpoint(out: Path) -> Path:
    save_file({"weight": torch.zeros(3)}, str(out))
    return out


@pytest.mark.parametrize("case", ["corrupt", "foreign", "foreign_pth", "bits5", "opset", "strict_trt",
                                  "no_folder", "missing", "trt_version", "trt_sm"])
def test_bad_input_exits_2_one_line_no_file(case: str, students: dict[str, Path], tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ckpt = students["4-4-8"]
    args: list[str] = []
    if case == "corrupt":
        ckpt = tmp_path / "corrupt.safetensors"
        ckpt.write_bytes(students["4-4-8"].read_bytes()[:5000])
    elif case == "foreign":
        ckpt = _foreign_checkpoint(tmp_path / "foreign.safetensors")
    elif case == "foreign_pth":
        ckpt = tmp_path / "foreign.pth"
        torch.save({"model": {"x": torch.zeros(2)}}, ckpt)
    elif case == "bits5":
        ckpt = _bad_bits_checkpoint(students["4-4-8"], tmp_path / "bits5.safetensors")
    elif case == "opset":
        args = ["--opset", "19", "--weight-container", "int4"]
    elif case == "strict_trt":
        model = quantized_tiny("4-4-8", seed=6, act_granularity="channel")
        ckpt = save_student(model, tmp_path / "c.safetensors")
        args = ["--target", "tensorrt", "--strict-trt"]
    elif case == "missing":
        ckpt = tmp_path / "nope.safetensors"
    elif case == "trt_version":
        args = ["--target", "tensorrt", "--trt-version", "8.6"]
    elif case == "trt_sm":
        args = ["--target", "tensorrt", "--trt-sm", "orin"]
    out = out_dir / "model.onnx" if case != "no_folder" else tmp_path / "absent" / "model.onnx"
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not list(out_dir.iterdir()), list(out_dir.iterdir())
    if case == "opset":
        assert "use --opset 21 or --weight-container int8" in lines[0]
    if case == "strict_trt":
        assert "q_act" in lines[0] and "per-channel" in lines[0]
    if case == "bits5":
        assert "w_bits=5" in lines[0]
    if case == "trt_version":
        assert "TensorRT 8.6 is not supported: TensorRT 10.3 or newer is needed" in lines[0]
    if case == "trt_sm":
        assert "--trt-sm" in lines[0] and "MAJOR.MINOR" in lines[0]


def test_read_only_output_folder(students: dict[str, Path]) -> None:
    """/proc/self refuses new files even to root (chmod alone does not stop root)."""
    result = CliRunner().invoke(cli, ["export", str(students["4-4-8"]), "-o", "/proc/self/m.onnx"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "/proc/self" in lines[0], result.stderr


def test_cli_export_check_prints_table(students: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    args = ["export", str(students["3-3-8"]), "-o", str(out), "--target", "tensorrt", "--batch", "2"]
    args.append("--check")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity check PASSED" in result.output and "TensorRT lint" in result.output
    assert "float fake-quant fallback" in result.output  # unsigned 8-bit softmax codes do not fit int8


def _random_resnet_detr(preset: str, weight: tuple[float, float] = (0.3, 1.0)) -> torch.nn.Module:
    """A ResNet DETR preset, random weights (seed 0) and random valid frozen batch-norm statistics, eval."""
    torch.manual_seed(0)
    model = build_detr(get_preset(preset)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(*weight)
                m.bias.normal_(0, 0.05)
    return model


@pytest.mark.slow
def test_detr_r50_128px_tensorrt(tmp_path: Path) -> None:
    """DETR-R50, random weights, 4-4-8, 128x128, tensorrt target, one image (about 15 s on 2 cores)."""
    model = _random_resnet_detr("detr_r50", (0.2, 0.5))
    quantize(model, QuantConfig.from_bits("4-4-8"))
    calibrate(model, [torch.randn(1, 3, 128, 128)], progress=False)
    meta = {"calibration": {"image_size": [128, 128]}}
    path = save_checkpoint(model, tmp_path / "r50.safetensors", meta=meta)
    result = export_onnx(path, tmp_path / "r50.onnx", target="tensorrt")  # default flags: TensorRT 10.3
    report = check_onnx(result.path, model, random_images(1, (128, 128)))
    print(report.table())
    assert report.passed and report.lint == [], report.table()  # the lint for TensorRT 10.3
    assert lint_tensorrt(result.path, "10.3", (8, 7)) == []  # on an Orin too
    proto = onnx.load(str(result.path))
    assert not any(t.data_type == TensorProto.INT4 for t in proto.graph.initializer)


# --- conv_bias="int32": QLinearConv in the backbone -------------------------------------------------------

INT_CONVS = ("backbone.0.body.conv1", "backbone.0.body.layer1.0", "backbone.0.body.layer2.0")


@pytest.mark.parametrize("bits", ["2-2-8", "4-4-8", "8-8-8"])
def test_int32_conv_bias_parity_and_qlinearconv(students: dict[str, Path], bits: str, tmp_path: Path) -> None:
    """The int32-bias export still matches PyTorch (with the same bias rounding, check.as_exported) and
    onnxruntime runs the stem and layer1/layer2 convs as QLinearConv; layer3 feeds the float input_proj."""
    kernels = pytest.importorskip("qdetr_deploy.engines.onnxruntime")
    ckpt = load_checkpoint(students[bits])
    result = export_onnx(ckpt, tmp_path / "m.onnx", batch=2, weight_container="int8", conv_bias="int32")
    report = check_onnx(result.path, ckpt.model, tolerance=1e-4)
    print(f"{bits} int32 bias: prob {report.max_prob_diff:.2e} box {report.max_box_diff:.2e} "
          f"codes {100 * report.code_agreement:.4f}%")
    assert report.passed, report.table()
    assert report.code_agreement >= 0.999 and report.codes_compared > 100_000
    records = json.loads(_props(result.path)[onnx_export.QUANTIZERS_KEY])
    assert records["conv_bias"] == "int32" and set(records["bias_deltas"]) == set(INT_CONVS)
    assert records["int_convs"]["backbone.0.body.layer3.0"]  # a reason why it stays float
    proto = onnx.load(str(result.path))
    biases = [t for t in proto.graph.initializer if t.name.endswith(".bias_quantized")]
    assert len(biases) == 3 and all(t.data_type == TensorProto.INT32 for t in biases)
    so = kernels.session_options(1, "extended")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(result.path), so, providers=["CPUExecutionProvider"])
    rows = {r["node"]: r for r in kernels.integer_kernel_report(tmp_path / "opt.onnx")}
    for conv in INT_CONVS:
        assert rows[f"{conv}/Conv"]["op_type"] == "QLinearConv", rows[f"{conv}/Conv"]
    assert rows["backbone.0.body.layer3.0/Conv"]["op_type"] == "Conv"


def test_int32_rounding_is_bounded_and_int32_int8_are_the_default(students: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """A student quantized without QuantConfig.conv_bias still exports with int32 biases (the default for
    onnxruntime, with the int8 container): rounded by at most half a grid step, the deltas recorded, and
    the CLI says so."""
    model = load_checkpoint(students["4-4-8"]).model
    default, _ = build_onnx(model, SIZE)
    explicit, _ = build_onnx(model, SIZE, weight_container="int8", conv_bias="int32")
    assert default.graph == explicit.graph
    trt_default, _ = build_onnx(model, SIZE, target="tensorrt")
    trt_explicit, _ = build_onnx(model, SIZE, target="tensorrt", weight_container="int4", conv_bias="float")
    assert trt_default.graph == trt_explicit.graph
    proto, ctx = build_onnx(model, SIZE, weight_container="int8", conv_bias="int32")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(ctx.bias_deltas) == set(INT_CONVS)
    for conv, (module, delta) in ctx.bias_deltas.items():
        grid = inits[f"{conv}.bias_scale"].astype(np.float64)  # x_step * folded w_step, per channel
        assert np.all(np.abs(delta) <= 0.5 * grid * (1 + 1e-6) + 1e-12), conv
        assert module.endswith((".bn1", ".1"))  # the batch norm's bias takes the delta
        assert any(delta), conv  # the float biases of this model are off the grid
    with pytest.raises(Exception, match="onnxruntime target"):
        build_onnx(model, SIZE, target="tensorrt", conv_bias="int32")
    result = CliRunner().invoke(cli, ["export", str(students["4-4-8"]), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "3 conv biases rounded onto the int32 grid" in result.output
    result = CliRunner().invoke(cli, ["export", str(students["4-4-8"]), "-o", "/nonexistent/x.onnx",
                                      "--conv-bias", "bogus"])
    assert result.exit_code == 2


@pytest.mark.parametrize("bits", ["2-2-8", "4-4-8", "8-8-8"])
def test_int32_bias_carried_by_the_model_exports_exactly(bits: str, tmp_path: Path) -> None:
    """QuantConfig.conv_bias="int32": the batch norms after the quantized convs hold their folded bias on the
    int32 grid, so the default export rounds nothing (every recorded delta is exactly 0, the int32 codes
    times the grid give the model's bias bit for bit) and PyTorch and ONNX Runtime agree on every code."""
    from qdetr_deploy.quant.int_bias import IntBiasBatchNorm2d, deployed_affine

    model = quantized_tiny(bits, conv_bias="int32")
    norms = {n for n, m in model.named_modules() if isinstance(m, IntBiasBatchNorm2d)}
    assert norms == {"backbone.0.body.bn1", *(f"backbone.0.body.layer{i}.1" for i in (1, 2, 3))}
    ckpt = load_checkpoint(save_student(model, tmp_path / "s.safetensors"))
    assert ckpt.model.quant_config.conv_bias == "int32"
    assert set(ckpt.model.state_dict()) == set(model.state_dict())  # no new state: upstream names
    result = export_onnx(ckpt, tmp_path / "m.onnx", batch=2)
    assert result.rounded_biases == []
    records = json.loads(_props(result.path)[onnx_export.QUANTIZERS_KEY])
    assert set(records["bias_deltas"]) == set(INT_CONVS)
    assert all(d == 0.0 for e in records["bias_deltas"].values() for d in e["delta"])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(result.path)).graph.initializer}
    for conv in INT_CONVS:
        norm = ckpt.model.get_submodule(records["bias_deltas"][conv]["module"])
        bias = inits[f"{conv}.bias_quantized"].astype(np.float32) * inits[f"{conv}.bias_scale"]
        assert np.array_equal(bias, deployed_affine(norm)[1].numpy()), conv
    report = check_onnx(result.path, ckpt.model, tolerance=1e-4)
    assert report.passed and report.layer_code_agreement == 1.0, report.table()


# --- QuantConfig.residual_bits: the last conv of a ResNet block on integer kernels ------------------------

def _r18_residual(size: int, **kwargs) -> torch.nn.Module:
    model = _random_resnet_detr("detr_r18")
    quantize(model, QuantConfig.from_bits("4-4-8", residual_bits=8, **kwargs))
    return calibrate(model, [torch.randn(1, 3, size, size)], progress=False).eval()


def test_residual_quantizer_runs_every_block_conv_as_qlinearconv(tmp_path: Path) -> None:
    """DETR-R18 with residual_bits=8 at 64x64: the checkpoint keeps upstream names plus bnN.out_act and
    layerI.J.out_act, the int32-bias export matches PyTorch, and onnxruntime runs both convs of every block
    as QLinearConv and the residual adds as QLinearAdd; the stem, the full-precision downsample convs and
    input_proj stay float Convs."""
    from qdetr_deploy.engines.onnxruntime import (
        integer_kernel_report,
        kernel_report_summary,
        session_options,
    )

    model = _r18_residual(64, conv_bias="int32")  # quantize --preset onnxruntime
    meta = {"calibration": {"image_size": [64, 64]}}
    path = save_checkpoint(model, tmp_path / "r18.safetensors", meta=meta)
    loaded = load_checkpoint(path)
    assert loaded.model.quant_config.residual_bits == 8
    keys = loaded.model.state_dict().keys()
    assert {"backbone.0.body.layer4.1.bn2.weight", "backbone.0.body.layer4.1.bn2.out_act.alpha"} <= set(keys)
    assert sum(k.endswith("bn2.out_act.alpha") for k in keys) == 8  # the branch of each BasicBlock
    assert sum(k.endswith(".out_act.alpha") and "bn" not in k for k in keys) == 8  # each block's output
    result = export_onnx(loaded, tmp_path / "r18.onnx")  # the defaults: int8 container, int32 biases
    report = check_onnx(result.path, loaded.model, random_images(1, (64, 64), seed=3))
    assert report.passed, report.table()
    records = json.loads(_props(result.path)[onnx_export.QUANTIZERS_KEY])
    assert records["bias_deltas"] and result.rounded_biases == []  # the model carries its int32 biases
    assert {n for n, why in records["int_convs"].items() if not why} == {
        f"backbone.0.body.layer{i}.{j}.conv{k}" for i in range(1, 5) for j in range(2) for k in (1, 2)}
    so = session_options(1, "extended")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(result.path), sess_options=so, providers=["CPUExecutionProvider"])
    ops = kernel_report_summary(integer_kernel_report(onnx.load(so.optimized_model_filepath)))["by_op"]
    assert ops["QLinearConv"] == 16 and ops["Conv"] == 5, ops
    opt_ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    # blocks whose identity is the previous block's quantized output: layerN.1 (layer1.0 reads the stem)
    assert opt_ops.count("QLinearAdd") == 4, opt_ops.count("QLinearAdd")
    # between the two convs of a block: QLinearConv -> Clip on the uint8 codes (4-bit range) -> QLinearConv
    assert result.act_modes.get("q+uint8 clip+dq") == 8, result.act_modes


def test_residual_quantizer_without_the_option_and_for_tensorrt(tmp_path: Path) -> None:
    """No residual quantizers by default (the paper's full-precision residual adds); with them, the
    TensorRT export keeps the branch quantizer as int8 Q/DQ (zero point 0) on the add's input and passes
    the lint."""
    assert QuantConfig().residual_bits is None
    plain = quantize(build_detr(get_preset("detr_r18")), QuantConfig.from_bits("4-4-8"))
    assert not any(n.endswith("out_act") for n, _ in plain.named_modules())
    model = _r18_residual(64)
    meta = {"calibration": {"image_size": [64, 64]}}
    path = save_checkpoint(model, tmp_path / "r18.safetensors", meta=meta)
    result = export_onnx(path, tmp_path / "trt.onnx", target="tensorrt")
    assert not [n for n, _ in result.fallbacks if "bn2.out_act" in n]  # signed branch codes fit int8
    # a block's output is post-ReLU, unsigned [0, 255]: no int8 with zero point 0 holds it, so TensorRT gets
    # the exact float fake-quant subgraph there (reported as a fallback)
    outputs = [(n, why) for n, why in result.fallbacks if n.endswith(".out_act") and "bn" not in n]
    assert len(outputs) == 8 and all("unsigned 8-bit" in why for _, why in outputs), outputs
    names = {n.name for n in onnx.load(str(result.path)).graph.node}
    assert "backbone.0.body.layer1.0.bn2.out_act/QuantizeLinear" in names
    report = check_onnx(result.path, model, random_images(1, (64, 64), seed=4))
    assert report.passed and report.lint == [], report.table()


def test_zero_points_for_tensorrt_export_without_fallbacks(tmp_path: Path) -> None:
    """act_zero_point="zero": zero points stay 0 (not learned) and 8-bit activations are signed, so the
    TensorRT export writes every activation quantizer as int8 Q/DQ (no float fake-quant fallback), passes
    the lint and matches PyTorch; with learned zero points the same model has fallbacks."""
    learned = load_checkpoint(save_student(quantized_tiny("4-4-8"), tmp_path / "learned.safetensors"))
    assert export_onnx(learned, tmp_path / "learned.onnx", target="tensorrt", batch=2).fallbacks
    model = quantized_tiny("4-4-8", act_zero_point="zero")
    quantizers = [q for n, q in model.named_modules() if type(q).__name__ == "ActQuantizer"]
    assert all(float(q.zero_point.abs().max()) == 0 and not q.zero_point.requires_grad for q in quantizers)
    assert all(bool(q.signed) for q in quantizers if q.bits == 8)
    ckpt = load_checkpoint(save_student(model, tmp_path / "zero.safetensors"))
    assert ckpt.model.quant_config.act_zero_point == "zero"
    result = export_onnx(ckpt, tmp_path / "trt.onnx", target="tensorrt", batch=2)
    assert result.fallbacks == []
    report = check_onnx(result.path, ckpt.model, tolerance=1e-4)
    assert report.passed and report.lint == [], report.table()


def test_onnxruntime_preset_runs_the_whole_backbone_on_integer_kernels(tmp_path: Path) -> None:
    """DETR-R18 quantized with the onnxruntime preset (residual_bits 8, int32 biases, 8-bit downsample convs,
    shared block inputs) at 64x64: each block's first conv and downsample read the block input's codes (no
    state of their own, the same quantizer object after a checkpoint round trip), the export matches
    PyTorch, and onnxruntime runs every backbone conv (the stem and downsample too) as QLinearConv, every
    residual add as QLinearAdd and the stem's max pooling on uint8 codes: no float op between the image's
    quantizer and input_proj."""
    from qdetr_deploy.engines.onnxruntime import session_options

    model = _random_resnet_detr("detr_r18")
    quantize(model, QuantConfig.from_preset("onnxruntime", "4-4-8"))
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False).eval()
    meta = {"calibration": {"image_size": [64, 64]}}
    path = save_checkpoint(model, tmp_path / "r18.safetensors", meta=meta)
    loaded = load_checkpoint(path)
    body = loaded.model.backbone[0].body
    assert body.layer2[0].conv1.act is body.layer1[1].out_act is body.layer2[0].downsample[0].act
    assert body.layer1[0].conv1.act is body.maxpool.out_act
    keys = set(loaded.model.state_dict())
    assert "backbone.0.body.maxpool.out_act.alpha" in keys
    assert "backbone.0.body.layer2.0.conv1.act.alpha" not in keys
    assert "backbone.0.body.layer2.0.downsample.1.out_act.alpha" in keys
    assert "backbone.0.body.layer2.0.conv2.act.alpha" in keys  # the second conv keeps its 4-bit quantizer
    result = export_onnx(loaded, tmp_path / "r18.onnx")
    report = check_onnx(result.path, loaded.model, random_images(1, (64, 64), seed=3))
    # every backbone code equal per layer (a transformer code may sit an ulp from a rounding boundary)
    assert report.passed and not [m for m in report.layer_mismatches if "backbone" in m[0]], report.table()
    records = json.loads(_props(result.path)[onnx_export.QUANTIZERS_KEY])
    convs = {f"backbone.0.body.layer{i}.{j}.conv{k}" for i in range(1, 5) for j in range(2) for k in (1, 2)}
    convs |= {"backbone.0.body.conv1"} | {f"backbone.0.body.layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert {n for n, why in records["int_convs"].items() if not why} == convs, records["int_convs"]
    assert result.rounded_biases == []  # the model carries every int32 bias
    so = session_options(1, "extended")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(result.path), sess_options=so, providers=["CPUExecutionProvider"])
    nodes = onnx.load(so.optimized_model_filepath).graph.node
    backbone = [n.op_type for n in nodes if "backbone" in n.name]
    assert backbone.count("QLinearConv") == 20 and backbone.count("QLinearAdd") == 8, backbone
    assert not {"Conv", "Add"} & set(backbone), backbone
    producer = {o: n for n in nodes for o in n.output}
    pool = next(n for n in nodes if n.op_type == "MaxPool")
    assert producer[pool.input[0]].op_type == "QLinearConv"  # the stem's uint8 codes are pooled
    dq = [n.name for n in nodes if "backbone" in n.name and n.op_type == "DequantizeLinear"]
    assert dq == [], dq
    assert not [n for n in nodes if n.op_type == "Conv"]
    # input_proj (8-bit) reads the last block's codes on the sequence: one integer matmul with its bias
    (proj,) = [n for n in nodes if n.name == "input_proj/MatMul"]
    assert proj.op_type == "MatMulIntegerToFloat" and len(proj.input) == 7, proj
    assert producer[proj.input[0]].name == "input_proj/to_sequence"


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_quantized_input_proj_on_a_float_block_output(tmp_path: Path, target: str) -> None:
    """The paper's placement plus ``input_proj_bits``: the last ResNet block's output is float, so
    input_proj quantizes it itself. onnxruntime: a MatMul on the sequence (flatten, transpose, then its own
    quantizer) that runs as one MatMulIntegerToFloat with its bias; tensorrt keeps the Conv. Both match
    PyTorch."""
    model = _random_resnet_detr("detr_r18")
    quantize(model, QuantConfig.from_preset("paper", "4-4-8", input_proj_bits=8))
    calibrate(model, [torch.randn(1, 3, 64, 64)], progress=False).eval()
    proto, _ = build_onnx(model, (64, 64), target=target)
    path = save_onnx(proto, tmp_path / "m.onnx")
    report = check_onnx(path, model, random_images(1, (64, 64), seed=5))
    assert report.passed, report.table()
    ops = {n.name: n.op_type for n in proto.graph.node if n.name.startswith("input_proj")}
    if target == "onnxruntime":
        assert ops["input_proj/MatMul"] == "MatMulIntegerToFloat" and "input_proj/Conv" not in ops, ops
        assert ops["input_proj.act/QuantizeLinear"] == "QuantizeLinear", ops
    else:
        assert ops["input_proj/Conv"] == "Conv", ops
