"""Checkpoints (ours and upstream DETR) and ``qdetr-deploy inspect``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qdetr_deploy.checkpoints import infer_detr_config, load_checkpoint, save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.quant import QuantConfig, calibrate, quantize
from qdetr_deploy.quant.accounting import PAPER_DETR_R50


def _quantized_tiny(bits: str = "4-4-8") -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits(bits, da="both"))
    return calibrate(model, [torch.randn(2, 3, 64, 64)], progress=False).eval()


def test_save_load_round_trip_identical_outputs(tmp_path: Path) -> None:
    model = _quantized_tiny()
    path = save_checkpoint(model, tmp_path / "student.safetensors", category_ids=[1, 2, 3],
                           meta={"stage": "quantized"})
    ckpt = load_checkpoint(path)
    assert ckpt.quant_config == model.quant_config
    assert ckpt.category_ids == [1, 2, 3] and ckpt.meta["stage"] == "quantized"
    x = torch.randn(2, 3, 64, 64)
    a, b = model(x), ckpt.model.eval()(x)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def _upstream_r50_state() -> dict[str, torch.Tensor]:
    from tests.conftest import shared_path

    keys = shared_path("reference", "detr_r50_state_dict_keys.txt").read_text().splitlines()
    gen = torch.Generator().manual_seed(0)
    state = {}
    for line in keys:
        name, shape, _ = line.split("\t")
        shape = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
        value = torch.randn(shape, generator=gen) * 0.02
        if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")):
            value = value.abs() + 0.5  # a valid variance / scale keeps the random network finite
        state[name] = value
    return state


def test_upstream_r50_checkpoint_loads_and_matches(tmp_path: Path) -> None:
    state = _upstream_r50_state()
    assert len(state) == 458
    torch.save({"model": state}, tmp_path / "detr-r50.pth")
    ckpt = load_checkpoint(tmp_path / "detr-r50.pth")
    assert ckpt.detr_config.backbone == "resnet50" and ckpt.detr_config.num_classes == 91
    reference = build_detr(get_preset("detr_r50")).eval()
    reference.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = ckpt.model.eval()(x), reference(x)
    assert torch.isfinite(a["pred_boxes"]).all()
    assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_logits"], b["pred_logits"])


def test_upstream_training_checkpoint_needs_trust(tmp_path: Path) -> None:
    model = build_detr(get_preset("detr_tiny"))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    with pytest.raises(QDetrError, match="--trust-checkpoint"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust=True).meta["epoch"] == 3
    result = CliRunner().invoke(cli, ["inspect", str(path), "--input-size", "64", "64", "--json"])
    assert result.exit_code == 2 and "--trust-checkpoint" in result.output
    result = CliRunner().invoke(cli, ["inspect", str(path), "--input-size", "64", "64", "--json",
                                      "--trust-checkpoint", "--no-layers"])
    assert result.exit_code == 0, result.output


def test_infer_config_from_tiny_state() -> None:
    model = build_detr(get_preset("detr_tiny"))
    cfg = infer_detr_config(model.state_dict())
    assert (cfg.backbone, cfg.hidden_dim, cfg.nheads, cfg.num_queries, cfg.num_classes) == (
        "tiny", 96, 3, 10, 3)


def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = save_checkpoint(_quantized_tiny(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    r18 = build_detr(get_preset("detr_r18"))
    state = r18.state_dict()
    state.pop("class_embed.weight")
    torch.save({"model": state}, tmp_path / "missing_keys.pth")
    other = build_detr(get_preset("detr_tiny"))
    foreign = {k: v for k, v in other.state_dict().items()}
    foreign["input_proj.weight"] = torch.zeros(96, 64, 1, 1)
    torch.save({"model": foreign}, tmp_path / "wrong_arch.pth")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "not_detr.pth")
    return {p.stem: p for p in tmp_path.iterdir() if p.stem != "good"}


def test_bad_checkpoints_give_one_line_and_exit_2(tmp_path: Path) -> None:
    for name, path in _bad_checkpoints(tmp_path).items():
        result = CliRunner().invoke(cli, ["inspect", str(path), "--json", "--input-size", "64", "64"])
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], (name, lines)
        assert "Traceback" not in result.output


@pytest.mark.parametrize("bits", ["4-4-8", "3-3-8", "2-2-8"])
def test_inspect_reproduces_paper_reduction_factors(bits: str) -> None:
    args = ["inspect", "--arch", "detr_r50", "--bits", bits, "--json", "--no-layers"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    paper = PAPER_DETR_R50[bits]
    for key in ("size_reduction", "ops_reduction"):
        assert report[key] == pytest.approx(paper[key], rel=0.05), (key, report[key], paper[key])
    assert report["input_size"] == [800, 1133]
    assert {"size_mb", "gops", "size_reduction", "ops_reduction", "input_size"} <= set(report)


def test_inspect_table_lists_layers() -> None:
    result = CliRunner().invoke(cli, ["inspect", "--arch", "detr_tiny", "--bits", "4-4-8",
                                      "--input-size", "96", "96"])
    assert result.exit_code == 0, result.output
    assert "backbone.0.body.conv1" in result.output and "operations" in result.output
    result = CliRunner().invoke(cli, ["inspect", "--arch", "nope"])
    assert result.exit_code == 2 and "unknown DETR preset" in result.output
