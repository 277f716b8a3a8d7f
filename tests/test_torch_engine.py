"""Torch GPU engine (``.qdtorch``): build from a quantized checkpoint, open, run, and compare with the
PyTorch fake-quant model through the same post-processing (CPU reference ops here; the CUDA variant, with
CUDA graphs and float16, skips without a GPU)."""

from __future__ import annotations

import copy
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qdetr_deploy.checkpoints import load_checkpoint, save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.engines import open_engine
from qdetr_deploy.engines.torch_gpu import TorchGpuEngine, check_device, read_engine_metadata
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.torch_engine import (
    FakeQuantLayer,
    IntAttention,
    IntConv2d,
    IntLinear,
    build_torch_engine,
    convert_model,
)
from qdetr_deploy.models import build_detr, get_preset, postprocess
from qdetr_deploy.quant import QuantConfig, calibrate, quantize

H, W = 64, 96
BOX_TOL = 1e-3  # normalised box coordinates
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")


def _quantized(bits: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits(bits, **kw))
    calibrate(model, [torch.randn(2, 3, H, W)], progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """Calibrated detr_tiny models; tests that convert in place take a copy."""
    return {"4-4-8": _quantized("4-4-8"), "4-8-8": _quantized("4-8-8"),
            "channel": _quantized("4-4-8", act_granularity="channel")}


def _save(model: torch.nn.Module, path: Path) -> Path:
    return save_checkpoint(model, path, meta={"calibration": {"image_size": [H, W]}})


@pytest.fixture(scope="module", params=["4-4-8", "4-8-8"])
def ckpt(request, models, tmp_path_factory) -> Path:
    return _save(models[request.param], tmp_path_factory.mktemp(f"ckpt{request.param}") / "q.safetensors")


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, H, W)).astype(np.float32)


def _reference_outputs(source: Path | torch.nn.Module, x: np.ndarray,
                       device: str = "cpu") -> dict[str, np.ndarray]:
    """The PyTorch fake-quant model (float32; a checkpoint path or a model) through models.postprocess."""
    model = source if isinstance(source, torch.nn.Module) else load_checkpoint(source).model
    model = model.eval().to(device)
    with torch.no_grad():
        out = model(torch.from_numpy(x).to(device))
        sizes = torch.tensor([[H, W]] * len(x), device=device)
        scores, labels, boxes = postprocess(out["pred_logits"], out["pred_boxes"], sizes)
    return {"scores": scores.cpu().numpy(), "labels": labels.cpu().numpy(), "boxes": boxes.cpu().numpy()}


def _box_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b) / np.array([W, H, W, H], np.float32)).max())


def test_engine_matches_fake_quant_on_cpu(ckpt, tmp_path):
    out = build_torch_engine(ckpt, tmp_path / "m.qdtorch", 4, image_size=(H, W), batch=None, device="cpu",
                             max_batch=4)
    engine = open_engine(out)
    assert isinstance(engine, TorchGpuEngine) and engine.device == "cpu" and engine.max_batch == 4
    assert engine.input_spec.shape == ["batch", 3, H, W] and engine.peak_device_memory() is None
    meta = engine.metadata
    assert meta["engine"]["fake_quant_layers"] == {"backbone.0.body.conv1": "8-bit weights (the kernels "
                                                   "hold int4)"}
    reference = load_checkpoint(ckpt).model
    assert meta["engine"]["int_layers"] > 30 and meta["bits"] == reference.quant_config.bits
    for n in (1, 3):
        x = _images(n, seed=n)
        got, want = engine.run(x), _reference_outputs(reference, x)
        assert set(got) == {"scores", "labels", "boxes"} and got["labels"].dtype == np.int64
        diff = _box_diff(got["boxes"], want["boxes"])
        print(f"{meta['bits']} batch {n}: max normalised box diff {diff:.3g}, "
              f"max score diff {np.abs(got['scores'] - want['scores']).max():.3g}")
        assert diff < BOX_TOL
        assert np.abs(got["scores"] - want["scores"]).max() < 1e-3
        assert (got["labels"] == want["labels"]).mean() > 0.95


def test_conversion_kinds_and_per_channel_fallback(models):
    model = copy.deepcopy(models["4-4-8"])
    conv = convert_model(model)
    body = model.backbone[0].body
    assert isinstance(body.conv1, FakeQuantLayer) and isinstance(body.layer1[0], IntConv2d)
    assert isinstance(body.layer1[1], torch.nn.Identity)  # BatchNorm folded into the epilogue
    attn = model.transformer.encoder.layers[0].self_attn
    assert isinstance(attn, IntAttention) and isinstance(attn.q_proj, IntLinear)
    assert isinstance(attn.out_proj, IntLinear) and attn.q_proj.spec.bits == 4
    assert len(conv.int_layers) == len(set(conv.int_layers))
    conv = convert_model(copy.deepcopy(models["channel"]))
    assert not conv.int_layers and "transformer.encoder.layers.0.linear1" in conv.fake_quant
    assert "per-channel" in conv.fake_quant["transformer.encoder.layers.0.linear1"]


def test_strict_refuses_per_channel(models, tmp_path):
    with pytest.raises(QDetrError, match="cannot run the integer kernels: .*per-channel"):
        build_torch_engine(models["channel"], tmp_path / "s.qdtorch", image_size=(H, W), device="cpu",
                           strict=True)
    assert not (tmp_path / "s.qdtorch").exists()


def test_build_engine_cli_and_errors(models, tmp_path):
    ckpt = _save(models["4-4-8"], tmp_path / "q.safetensors")
    out = tmp_path / "x.qdtorch"
    runner = CliRunner()
    res = runner.invoke(cli, ["build-engine", str(ckpt), "-o", str(out), "--backend", "torch", "--bits",
                              "4-4-8"])
    assert res.exit_code == 0, res.output
    summary, wrote = res.output.strip().splitlines()
    assert wrote == f"wrote {out}"
    assert re.fullmatch(r"int4 kernels: (\d+) of (\d+) quantized layers; float fake-quant: 1 with 8-bit "
                        r"weights \(the kernels hold int4\) \(e\.g\. backbone\.0\.body\.conv1\)", summary)
    engine = open_engine(out)
    assert engine.static_batch == 1 and engine.metadata["input_size"] == [H, W]
    x = _images(1)
    assert _box_diff(engine.run(x)["boxes"], _reference_outputs(models["4-4-8"], x)["boxes"]) < BOX_TOL
    res = runner.invoke(cli, ["build-engine", str(ckpt), "-o", str(tmp_path / "y.qdtorch"),
                              "--backend", "torch"])
    assert res.exit_code == 2 and "--bits 8" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["build-engine", str(ckpt), "-o", str(tmp_path / "y.qdtorch"),
                              "--backend", "torch", "--bits", "2-2-8"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "--bits 2-2-8 contradicts the checkpoint's 4-4-8" in res.output
    # an engine built for another device: exit 2 and one line
    other = tmp_path / "other.qdtorch"
    _with_device(out, other, {"type": "cuda", "name": "NVIDIA H200", "compute_capability": [9, 0]})
    res = runner.invoke(cli, ["bench", str(other), "--warmup", "0", "--iters", "1"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    if not torch.cuda.is_available():
        assert "built for NVIDIA H200 (sm_90), but this machine has no CUDA GPU" in lines[0]
    (tmp_path / "junk.qdtorch").write_bytes(b"junk")
    with pytest.raises(QDetrError, match="not a qdetr torch engine"):
        open_engine(tmp_path / "junk.qdtorch")


def _with_device(src: Path, dst: Path, device: dict) -> None:
    """Copy an engine archive with ``engine.device`` replaced in its metadata."""
    meta = read_engine_metadata(src)
    meta["engine"]["device"] = device
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/extra/qdetr.json"):
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


def test_device_check_messages():
    h200 = {"type": "cuda", "name": "NVIDIA H200", "compute_capability": [9, 0]}
    orin = {"type": "cuda", "name": "Orin", "compute_capability": [8, 7]}
    check_device({"type": "cpu"}, {"type": "cpu", "name": "cpu"})
    check_device(h200, dict(h200))
    with pytest.raises(QDetrError, match=r"built for NVIDIA H200 \(sm_90\), this is Orin \(sm_87\)"):
        check_device(h200, orin)


@needs_cuda
@pytest.mark.gpu
def test_engine_on_cuda_with_graphs(ckpt, tmp_path):
    """float32 engine (Triton kernels) within BOX_TOL of the quantized PyTorch model; the float16 engine
    (CUDA graphs) within a looser bound (float16 rounding flips codes at rounding boundaries); peak memory
    reported."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    x = _images(2)
    want = _reference_outputs(ckpt, x, "cuda")
    diffs = {}
    for dtype, tol in (("float32", BOX_TOL), ("float16", 5e-2)):
        out = build_torch_engine(ckpt, tmp_path / f"{dtype}.qdtorch", image_size=(H, W), batch=None,
                                 device="cuda", max_batch=4, dtype=dtype)
        engine = open_engine(out)
        assert engine.device == "cuda" and engine.use_graphs
        for _ in range(2):  # the second call replays the captured graph
            got = engine.run(x)
        diffs[dtype] = _box_diff(got["boxes"], want["boxes"])
        assert diffs[dtype] < tol, diffs
        assert _box_diff(engine.run(x[:1])["boxes"], got["boxes"][:1]) < 1e-5  # batch 1: its own graph
        assert engine.peak_device_memory() > 0
    print(f"CUDA max normalised box diff: {diffs}")


def test_residual_quantizer_survives_conversion():
    """DETR-R18 with residual_bits=8: folding each block's last batch norm into its IntConv2d keeps the
    residual-branch quantizer (bnN.out_act) as a FakeQuantAct, and a converted block gives the fake-quant
    block's output on the same input (a whole random R18 is compared per block: end to end, one code a
    float ulp across a rounding boundary cascades through 8 random blocks)."""
    torch.manual_seed(0)
    # quantize's default preset: residual_bits 8 and conv biases on the int32 grid (QuantConfig.conv_bias)
    model = quantize(build_detr(get_preset("detr_r18")), QuantConfig.from_preset("onnxruntime", "4-4-8"))
    calibrate(model, [torch.randn(1, 3, H, W)], progress=False)
    model.eval()
    engine_model = copy.deepcopy(model)
    conv = convert_model(engine_model)
    assert "backbone.0.body.layer1.0.conv2" in conv.int_layers
    block = engine_model.backbone[0].body.layer1[0]
    assert type(block.bn2).__name__ == "FakeQuantAct" and type(block.bn1) is torch.nn.Identity
    assert type(block.out_act).__name__ == "FakeQuantAct"  # frozen: torch.export cannot trace a live one
    # the 8-bit stem stays fake-quant; its int-bias batch norm is frozen as deployed
    assert type(engine_model.backbone[0].body.bn1).__name__ == "FoldedNorm"
    # the block's input as the model makes it: the stem pooling's codes (the preset's shared_block_input)
    x = model.backbone[0].body.maxpool.out_act(torch.relu(torch.randn(1, 64, 16, 24)))
    with torch.no_grad():
        want, got = model.backbone[0].body.layer1[0](x), block(x)
        step = float(model.backbone[0].body.layer1[0].bn2.out_act.qparams().step)
    close = (got - want).abs() <= 1e-4
    print(f"block outputs equal within 1e-4: {100 * close.float().mean():.4f}%")
    assert close.float().mean() >= 0.999
    assert (got - want).abs().max() <= 1.5 * step  # a flipped residual code moves one step


@pytest.mark.slow
def test_residual_quantizer_engine_builds_and_runs(tmp_path):
    """The whole GPU-engine build (torch.export) of a DETR-R18 with quantize's default preset (residual_bits
    8, int32 conv biases), on the CPU."""
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_r18")), QuantConfig.from_preset("onnxruntime", "4-4-8"))
    calibrate(model, [torch.randn(1, 3, H, W)], progress=False)
    out = build_torch_engine(_save(model.eval(), tmp_path / "r18.safetensors"), tmp_path / "r18.qdtorch", 4,
                             image_size=(H, W), batch=None, device="cpu", max_batch=2)
    got = open_engine(out).run(_images(1))
    assert got["boxes"].shape == (1, 100, 4) and np.isfinite(got["boxes"]).all()
