"""Torch engine (``.qdtorch``) of the released Q-DETR SMCA-DETR (the fixture checkpoint, FIXTURE.md).

What the int4 kernels can express of it: nothing. Every n-bit activation quantizer of the released model
has per-channel steps and zero points (the kernels take one of each per tensor: with a step per input
channel, sum_k (q_k - z_k) a_k c_nk is no integer product), the self-attention projections take float
inputs (the kernels take integer codes) and the stem has 8-bit weights. The engine runs those layers in
float fake-quant, the model's own forward, and says so in one line. It must equal the fake-quant model
(CPU reference path; the CUDA variant skips without a GPU). Small canvas (128 x 160) to stay fast.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qdetr_deploy.checkpoints import load_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.engines import open_engine
from qdetr_deploy.engines.torch_gpu import kernel_summary
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.torch_engine import (
    WEIGHT_ONLY_REASON,
    FakeQuantAct,
    Float32,
    build_torch_engine,
    convert_model,
)
from qdetr_deploy.models import sigmoid_topk
from qdetr_deploy.quant import QuantConfig
from qdetr_deploy.quant.quantizers import ActQuantizer
from tests.conftest import shared_path

H, W = 128, 160
BOX_TOL = 1e-3  # normalised box coordinates, as tests/test_torch_engine.py
PER_CHANNEL = "per-channel activation steps and zero points (the kernels take one of each per tensor)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return shared_path("data", "qdetr_released_fixture", "smca_small_4bit.pth")


@pytest.fixture(scope="module")
def images(checkpoint: Path) -> np.ndarray:
    """The fixture's two preprocessed coco128 images, cropped to the H x W canvas."""
    npz = np.load(checkpoint.parent / "inputs.npz", allow_pickle=False)
    return np.ascontiguousarray(npz["images"][:, :, :H, :W])


def _model(checkpoint: Path, bits: str) -> torch.nn.Module:
    return load_checkpoint(checkpoint, quant_config=QuantConfig.from_bits(bits)).model.eval()


def _detections(model: torch.nn.Module, x: np.ndarray, device: str = "cpu") -> dict[str, np.ndarray]:
    """The model's forward (no mask: the canvas is the image) through SMCA-DETR's sigmoid top-k."""
    model = model.to(device)
    with torch.no_grad():
        out = model(torch.from_numpy(x).to(device))
        sizes = torch.tensor([[H, W]] * len(x), device=device)
        scores, labels, boxes, _ = sigmoid_topk(out["pred_logits"].float(), out["pred_boxes"].float(), sizes)
    return {"scores": scores.cpu().numpy(), "labels": labels.cpu().numpy(), "boxes": boxes.cpu().numpy()}


def _compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    box = float((np.abs(got["boxes"] - want["boxes"]) / np.array([W, H, W, H], np.float32)).max())
    score = float(np.abs(got["scores"] - want["scores"]).max())
    print(f"{what}: max normalised box diff {box:.3g}, max score diff {score:.3g}")
    assert got["scores"].shape == want["scores"].shape
    assert box < BOX_TOL and score < 1e-3
    assert (got["labels"] == want["labels"]).mean() > 0.95


@pytest.fixture(scope="module")
def engine_path(checkpoint: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smca") / "m.qdtorch"
    return build_torch_engine(checkpoint, out, "4-4-8", image_size=(H, W), batch=None, device="cpu",
                              max_batch=2)


def test_released_engine_matches_fake_quant_on_cpu(checkpoint, images, engine_path):
    engine = open_engine(engine_path)
    meta = engine.metadata
    assert meta["bits"] == "4-4-8" and meta["input_size"] == [H, W] and engine.max_batch == 2
    fake = meta["engine"]["fake_quant_layers"]
    assert meta["engine"]["int_layers"] == 0
    # the fixture: 5 bottlenecks x 3 convs, 2 + 6 FFNs x 2 linears, 2 + 6 self-attentions x in/out_proj
    assert sum(r == PER_CHANNEL for r in fake.values()) == 15 + 16
    assert sum(r == WEIGHT_ONLY_REASON for r in fake.values()) == 16
    assert fake["backbone.0.body.conv1"].startswith("8-bit weights")
    assert fake["transformer.decoder.layers.5.linear2"] == PER_CHANNEL
    assert fake["transformer.encoder.layers.0.self_attn.in_proj"] == WEIGHT_ONLY_REASON
    line = kernel_summary(meta)
    assert line.startswith("int4 kernels: 0 of 48 quantized layers; float fake-quant: ") and "\n" not in line
    reference = _model(checkpoint, "4-4-8")
    for n in (1, 2):  # each batch size against the model at that batch size: in float32 a batch of 1 and
        got = engine.run(images[:n])  # of 2 may differ (ulps flip 4-bit codes; exact in float64)
        assert set(got) == {"scores", "labels", "boxes"} and got["boxes"].shape == (n, 20, 4)
        _compare(got, _detections(reference, images[:n]), f"4-4-8 engine, batch {n}")


def test_converted_2bit_model_matches_fake_quant(checkpoint, images):
    """The same file at 2-2-8 (what a user asking for 2 bits gets): the converted model (every quantizer
    frozen, DA in float32) equals the fake-quant model, eager on the CPU."""
    reference = _model(checkpoint, "2-2-8")
    model = copy.deepcopy(reference)
    conv = convert_model(model)
    assert not conv.int_layers and len(conv.fake_quant) == 48
    assert not any(isinstance(m, ActQuantizer) for m in model.modules())
    attn = model.transformer.decoder.layers[0].self_attn
    assert isinstance(attn.q_act, FakeQuantAct) and attn.q_act.channel_dim == 1
    assert attn.q_act.round_after_shift
    assert isinstance(attn.norm_q, Float32)
    _compare(_detections(model, images), _detections(reference, images), "2-2-8 converted model")


def test_build_engine_cli_on_released_file(checkpoint, tmp_path):
    """A released file stores no bits: without W-A-8 bits the build refuses in one line naming the flag."""
    runner = CliRunner()
    for bits in ("4", "8", "4-8-8"):
        out = tmp_path / f"b{bits}.qdtorch"
        res = runner.invoke(cli, ["build-engine", str(checkpoint), "-o", str(out), "--backend", "torch",
                                  "--bits", bits])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert "--bits 4-4-8" in lines[0] and not out.exists()
    res = runner.invoke(cli, ["build-engine", str(checkpoint), "-o", str(tmp_path / "x.qdtorch"),
                              "--backend", "torch", "--bits", "four"])
    assert res.exit_code == 2 and "W-A-ATTN" in res.output
    with pytest.raises(QDetrError, match="keeps its sigmoid top-k"):
        build_torch_engine(checkpoint, tmp_path / "raw.qdtorch", "2-2-8", postprocess=False, device="cpu")
    assert not (tmp_path / "raw.qdtorch").exists()


@needs_cuda
@pytest.mark.gpu
def test_released_engine_on_cuda(checkpoint, images, tmp_path):
    """float32 CUDA engine (CUDA graphs) within the CPU tolerance of the fake-quant model on CUDA."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out = build_torch_engine(checkpoint, tmp_path / "c.qdtorch", "4-4-8", image_size=(H, W), batch=None,
                             device="cuda", max_batch=2, dtype="float32")
    engine = open_engine(out)
    assert engine.device == "cuda" and engine.use_graphs
    for _ in range(2):  # the second call replays the captured graph
        got = engine.run(images)
    _compare(got, _detections(_model(checkpoint, "4-4-8"), images, "cuda"), "4-4-8 CUDA float32 engine")
