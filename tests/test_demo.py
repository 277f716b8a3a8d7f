"""``qdetr-deploy demo --quick``: the whole pipeline end to end at smoke budgets."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from qdetr_deploy.checkpoints import load_checkpoint
from qdetr_deploy.cli import cli


def test_demo_quick_runs_every_stage_and_reuses_them(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "| full precision |" in result.output and "| 4-4-8 Q-DETR |" in result.output
    summary = json.loads((workdir / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["full precision", "4-4-8 Q-DETR"]
    assert summary["rows"][1]["size_mb"] < summary["rows"][0]["size_mb"] / 4
    for name in ("teacher", "student"):
        assert summary["exports"][name]["check_passed"], summary["exports"][name]
    assert "latency p50 at 320x320 (ms)" in result.output  # the same checkpoints where the kernels matter
    assert all(r["speed_p50_ms"] > 0 for r in summary["rows"])
    student = load_checkpoint(workdir / "student" / "checkpoint.safetensors")
    assert student.quant_config.conv_bias == "int32"  # quantize's default preset: exact int32 biases
    for artefact in ("teacher.onnx", "student.onnx", "student.ortengine", "report/bench.md",
                     "teacher_320.onnx", "student_320.onnx",
                     "report/latency.png", "report/ap_vs_latency.png", "report/predict/detections.json"):
        assert (workdir / artefact).is_file(), artefact
    with Image.open(summary["picture"]) as picture:  # the 4-bit engine's detections, drawn
        assert picture.format in ("JPEG", "PNG")  # the shapes set is JPEG: the picture stays JPEG
    assert Path(summary["picture"]).parent == workdir / "report" / "predict"
    again = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(workdir)])
    assert again.exit_code == 0 and "[teacher] reusing" in again.output, again.output
