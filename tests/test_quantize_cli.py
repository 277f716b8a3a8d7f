"""``qdetr-deploy quantize``: teacher -> calibrated student; ``export`` accepts its output unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_export import float_tiny, one_torch_thread  # noqa: F401 (autouse fixture)

from qdetr_deploy.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.quant import act_quantizers


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """Five small RGB images of different sizes (one PNG in a sub-folder) and a non-image file."""
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 64), (64, 40), (70, 70), (30, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.jpg")
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(root / "sub" / "img9.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return save_checkpoint(float_tiny(seed=7), path, category_ids=[1, 3, 5], meta={"stage": "trained"})


def _quantize(teacher: Path, out: Path, calib: Path, *extra: str):
    return CliRunner().invoke(cli, ["quantize", str(teacher), "-o", str(out), "--bits", "4-4-8", "--calib",
                                    str(calib), "--image-size", "64", "64", "--batch-size", "2", *extra])


def test_quantize_writes_calibrated_student(teacher: Path, calib_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    result = _quantize(teacher, out, calib_dir, "--calib-size", "4", "--method", "minmax", "--da", "both")
    assert result.exit_code == 0, result.output + result.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.quant_config.bits == "4-4-8" and ckpt.quant_config.da == "both"
    # the default preset, onnxruntime: 8-bit residual adds and conv biases on the int32 grid
    assert (ckpt.quant_config.residual_bits, ckpt.quant_config.conv_bias) == (8, "int32")
    assert all(q.initialised for _, q in act_quantizers(ckpt.model))
    assert ckpt.category_ids == [1, 3, 5]
    meta = ckpt.meta
    assert meta["stage"] == "quantized"
    assert meta["source"]["sha256"] == file_sha256(teacher) and meta["source"]["path"] == str(teacher)
    assert meta["calibration"] == {"images": str(calib_dir), "count": 4, "method": "minmax",
                                   "image_size": [64, 64], "batch_size": 2}
    assert not list(tmp_path.glob(".*tmp"))


def test_export_accepts_quantize_output_unchanged(teacher: Path, calib_dir: Path, tmp_path: Path) -> None:
    student = tmp_path / "student.safetensors"
    assert _quantize(teacher, student, calib_dir).exit_code == 0
    for target in ("onnxruntime", "tensorrt"):
        out = tmp_path / f"{target}.onnx"
        args = ["export", str(student), "-o", str(out), "--target", target, "--check", "--check-images",
                str(calib_dir)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output + result.stderr
        assert "parity check PASSED on 5 images" in result.output
        assert "rounded onto the int32 grid" not in result.output  # the student carries its int32 biases
        meta = json.loads((tmp_path / f"{target}.onnx.json").read_text())
        assert meta["input_size"] == [64, 64] and meta["bits"] == "4-4-8"
        assert meta["category_ids"] == [1, 3, 5]


def test_quantize_deployment_options(teacher: Path, calib_dir: Path, tmp_path: Path) -> None:
    """--preset paper with --zero-points zero and --residual-bits 8: the options override the preset and
    reach the student's QuantConfig (the tiny model has no ResNet blocks, so no residual quantizer
    appears) and the TensorRT export then needs no fallback."""
    student = tmp_path / "student.safetensors"
    result = _quantize(teacher, student, calib_dir, "--preset", "paper", "--zero-points", "zero",
                       "--residual-bits", "8")
    assert result.exit_code == 0, result.output + result.stderr
    config = load_checkpoint(student).quant_config
    assert config.act_zero_point == "zero" and config.residual_bits == 8 and config.conv_bias == "float"
    out = tmp_path / "trt.onnx"
    result = CliRunner().invoke(cli, ["export", str(student), "-o", str(out), "--target", "tensorrt",
                                      "--strict-trt", "--check"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity check PASSED" in result.output


def test_quantize_upstream_pth_teacher(calib_dir: Path, tmp_path: Path) -> None:
    pth = tmp_path / "upstream.pth"
    torch.save({"model": float_tiny(seed=8).state_dict(), "epoch": 3}, pth)
    out = tmp_path / "s.safetensors"
    result = _quantize(pth, out, calib_dir, "--calib-size", "2")
    assert result.exit_code == 0, result.output + result.stderr
    assert load_checkpoint(out).meta["source"]["meta"]["epoch"] == 3


@pytest.mark.parametrize("case", ["no_dir", "empty_dir", "bits", "already_quantized", "no_out_folder"])
def test_quantize_bad_input_exits_2(case: str, teacher: Path, calib_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, calib, extra, src = out_dir / "s.safetensors", calib_dir, [], teacher
    if case == "no_dir":
        calib = tmp_path / "missing"
    elif case == "empty_dir":
        calib = tmp_path / "empty"
        calib.mkdir()
        (calib / "readme.txt").write_text("no images here")
    elif case == "bits":
        extra = ["--bits", "4-5-8"]
    elif case == "already_quantized":
        src = tmp_path / "q.safetensors"
        assert _quantize(teacher, src, calib_dir, "--calib-size", "2").exit_code == 0
    else:
        out = tmp_path / "absent" / "s.safetensors"
    result = _quantize(src, out, calib, *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not list(out_dir.iterdir())
