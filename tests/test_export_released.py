"""ONNX export of the released Q-DETR SMCA-DETR (the fixture checkpoint,
../shared/data/qdetr_released_fixture/smca_small_4bit.pth; skipped when absent).

96x128 canvases (a 3x4 feature map) and two coco128 images keep it fast. Float32 forwards of a 4-bit
network cannot be compared end to end (one code flipped by float summation order cascades, FIXTURE.md 3),
so the bar is the per-layer check: every layer given the same quantized inputs (export/check.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from test_export import one_torch_thread, quantized_tiny, save_student  # noqa: F401 (autouse fixture)
from test_lowering import _must_lower

from qdetr_deploy.checkpoints import Checkpoint, load_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.export.calibration import list_images, load_images
from qdetr_deploy.export.check import check_onnx
from qdetr_deploy.export.lower import missing_rules
from qdetr_deploy.export.onnx_export import build_onnx, export_onnx
from qdetr_deploy.export.trt_lint import lint_tensorrt
from qdetr_deploy.models import build_model, get_preset, sigmoid_topk
from qdetr_deploy.quant import QuantConfig
from qdetr_deploy.released import released_quant_config
from tests.conftest import shared_path

SIZE = (96, 128)  # not square: H and W (the reference scale, the grid) cannot be swapped unseen


@pytest.fixture(scope="module")
def released_file() -> Path:
    return shared_path("data", "qdetr_released_fixture", "smca_small_4bit.pth")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    files = list_images(shared_path("data", "coco128", "train2017"), 2)
    return load_images(files, SIZE)


def _load(path: Path, bits: str = "4-4-8") -> Checkpoint:
    return load_checkpoint(path, quant_config=QuantConfig.from_bits(bits))


@pytest.mark.parametrize("quantized", [False, True])
def test_smca_modules_each_lowered_by_their_rule(quantized: bool) -> None:
    """Every module of SMCA-DETR (float, and with the released quantizer placement) has a rule or is
    consumed by its owner's rule, and the export runs each rule-owning module's rule exactly once."""
    torch.manual_seed(0)
    model = build_model(get_preset("smca_small")).eval()
    if quantized:
        from qdetr_deploy.quant import quantize

        quantize(model, released_quant_config("4-4-8"))
        for q in (m for m in model.modules() if type(m).__name__ == "ActQuantizer"):
            q.init_state.fill_(1)
    assert missing_rules(model) == []
    _, ctx = build_onnx(model, SIZE)
    assert sorted(ctx.lowered) == sorted(_must_lower(model))


@pytest.mark.parametrize(("bits", "target"), [("4-4-8", "onnxruntime"), ("4-4-8", "tensorrt"),
                                              ("2-2-8", "onnxruntime")])
def test_released_export_matches_per_layer(released_file: Path, images: np.ndarray, bits: str, target: str,
                                           tmp_path: Path) -> None:
    """The released checkpoint (the same file at 4 and 2 bits) exports for both targets and every layer
    matches PyTorch on real images. Per-channel conv inputs are per-axis Q/DQ for onnxruntime; the
    per-channel/per-head quantizers before MatMuls (onnxruntime) and all of them (TensorRT: per-tensor
    activation scales only) are the exact float fake-quant fallback, each reported."""
    ckpt = _load(released_file, bits)
    result = export_onnx(ckpt, tmp_path / "m.onnx", image_size=SIZE, batch=2, target=target)
    report = check_onnx(result.path, ckpt.model, images, threads=1)
    print(f"{bits} {target}: {report.table()}")
    assert report.passed, report.table()
    assert report.layer_prob_diff <= 1e-5 and report.layer_box_diff <= 1e-5
    assert report.layer_code_agreement >= 0.9999 and report.codes_compared > 1_000_000
    reasons = {reason for _, reason in result.fallbacks}
    if target == "tensorrt":
        assert report.lint == [] and result.act_modes == {"float": 88}
        assert reasons == {"per-channel/per-head activation steps (TensorRT takes per-tensor activation "
                           "scales)"}
    else:  # the 16 backbone conv inputs (stem RGB + 5 blocks x 3) stay integer Q/DQ, per channel (2-bit
        # codes with a Clip to each channel's range first)
        modes = result.act_modes
        assert modes["float"] == 72 and modes.get("qdq", 0) + modes.get("clip+qdq", 0) == 16, modes
        assert len(reasons) == 1
        # what TensorRT could not take of this graph: the lint names the per-channel activation scales
        flagged = {v.node for v in lint_tensorrt(result.path) if v.rule == "per-channel-activation"}
        assert "backbone.0.body.layer1.0.conv1.act/QuantizeLinear" in flagged
    assert result.metadata["bits"] == bits and result.metadata["num_classes"] == 91
    assert result.metadata["scoring"] == "sigmoid"  # raw pred_logits: a sigmoid per slot (bench, predict)


def test_strict_trt_refuses_per_channel_activations(released_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    args = ["export", str(released_file), "--bits", "4-4-8", "-o", str(out), "--image-size", *map(str, SIZE),
            "--target", "tensorrt", "--strict-trt"]
    result = CliRunner().invoke(cli, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "per-channel" in lines[0], result.stderr
    assert not out.exists()


def test_sigmoid_topk_in_the_graph(released_file: Path, images: np.ndarray) -> None:
    """The graph's post-processing is models.sigmoid_topk on its own logits and boxes, with k = the number
    of queries, label = index % 92 and boxes in pixels of the canvas."""
    model = _load(released_file).model
    graphs = {pp: build_onnx(model, SIZE, batch=2, postprocess=pp)[0] for pp in (False, True)}
    run = {pp: ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": images}) for pp, g in graphs.items()}
    logits, boxes = (torch.from_numpy(a) for a in run[False])
    scores, labels, xyxy = run[True]
    assert logits.shape == (2, 20, 92) and xyxy.shape == (2, 20, 4)
    assert scores.shape == labels.shape == (2, 20)
    ref_scores, ref_labels, ref_boxes, index = sigmoid_topk(logits, boxes, torch.tensor([SIZE, SIZE]))
    assert np.allclose(scores, ref_scores.numpy(), rtol=0, atol=1e-6)
    distinct = np.ones_like(scores, bool)  # equal scores may come in any order
    distinct[:, 1:] &= np.diff(ref_scores.numpy(), axis=1) != 0
    distinct[:, :-1] &= np.diff(ref_scores.numpy(), axis=1) != 0
    assert distinct.mean() > 0.5
    assert np.array_equal(labels[distinct], ref_labels.numpy()[distinct])
    assert np.allclose(xyxy[distinct], ref_boxes.numpy()[distinct], rtol=0, atol=1e-3)
    assert labels.max() < 92 and labels.min() >= 0


def test_int8_container_runs_weight_integer_kernels(released_file: Path, images: np.ndarray,
                                                    tmp_path: Path) -> None:
    """--weight-container int8 for onnxruntime: every quantized linear (self-attention projections, FFN)
    runs as an integer-weight kernel (MatMulNBits: per-channel activations keep their inputs float), and
    the model still matches per layer."""
    from qdetr_deploy.engines.onnxruntime import integer_kernel_report, session_options

    ckpt = _load(released_file)
    result = export_onnx(ckpt, tmp_path / "m.onnx", image_size=SIZE, batch=2, weight_container="int8")
    initializers = onnx.load(str(result.path)).graph.initializer
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in initializers)
    so = session_options(1, "extended")
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(result.path), so, providers=["CPUExecutionProvider"])
    integer = {r["node"] for r in integer_kernel_report(tmp_path / "opt.onnx") if r["integer"]}
    layers = ("self_attn.query_proj", "self_attn.key_proj", "self_attn.value_proj", "self_attn.out_proj",
              "linear1", "linear2")
    stacks = (("encoder", 2), ("decoder", 6))
    quantized = [f"transformer.{part}.layers.{i}.{layer}/MatMul" for part, n in stacks for i in range(n)
                 for layer in layers]
    assert set(quantized) <= integer, sorted(set(quantized) - integer)
    assert check_onnx(result.path, ckpt.model, images, threads=1).passed


def test_cli_export_released_with_bits(released_file: Path, tmp_path: Path) -> None:
    """``export released.pth --bits 4-4-8 --check`` writes and checks; without --bits (the file stores none)
    or with --bits on another kind of checkpoint: one line, exit 2, nothing written."""
    out = tmp_path / "m.onnx"
    base = ["export", str(released_file), "-o", str(out), "--image-size", *map(str, SIZE)]
    result = CliRunner().invoke(cli, [*base, "--bits", "4-4-8", "--check"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity check PASSED" in result.output and "fallback for 72 quantizers" in result.output
    out.unlink()
    Path(f"{out}.json").unlink()
    result = CliRunner().invoke(cli, base)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--bits 4-4-8" in lines[0], result.stderr
    ours = save_student(quantized_tiny("4-4-8"), tmp_path / "tiny.safetensors")
    result = CliRunner().invoke(cli, ["export", str(ours), "-o", str(out), "--bits", "4-4-8"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--bits is for released" in lines[0], result.stderr
    assert not out.exists()
