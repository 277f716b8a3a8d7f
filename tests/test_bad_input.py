"""Bad input, everywhere: every command answers a bad file or option with one line and exit 2.

Each case checks: a non-zero exit (2), exactly one output line starting with ``error:`` that names the
offending file (or option) and the problem, no traceback, and no output file left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from qdetr_deploy.checkpoints import load_checkpoint, save_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.data import make_shapes_dataset
from qdetr_deploy.models import build_detr, get_preset
from qdetr_deploy.quant import QuantConfig, calibrate, quantize

READ_ONLY = "/proc/self"  # writes fail there even as root (chmod alone does not stop root)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    data = make_shapes_dataset(root / "shapes", num_train=8, num_val=4, image_size=64, seed=1, progress=False)
    torch.manual_seed(0)
    fp = build_detr(get_preset("detr_tiny"))
    teacher = save_checkpoint(fp, root / "teacher.safetensors", category_ids=[1, 2, 3])
    q = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits("4-4-8"))
    calibrate(q, [torch.randn(2, 3, 64, 64)], progress=False)
    student = save_checkpoint(q, root / "student.safetensors", category_ids=[1, 2, 3])
    result = CliRunner().invoke(cli, ["export", str(student), "-o", str(root / "student.onnx"),
                                      "--image-size", "64", "64"])
    assert result.exit_code == 0, result.output
    paths = {k: Path(v) for k, v in data.items()}
    paths.update(root=root, teacher=teacher, student=student, onnx=root / "student.onnx")
    _bad_files(root, paths)
    return paths


def _bad_files(root: Path, p: dict[str, Path]) -> None:
    blob = p["student"].read_bytes()
    (root / "truncated.safetensors").write_bytes(blob[: len(blob) // 3])
    (root / "random.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    import torchvision

    torch.save({"model": torchvision.models.resnet18().state_dict()}, root / "resnet18.pth")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])])
    onnx.save(helper.make_model(graph), root / "not_detr.onnx")
    (root / "random.onnx").write_bytes(b"\x08\x07garbage" * 50)
    (root / "malformed.json").write_text('{"images": [1, 2,')
    (root / "empty.json").write_text("")
    ann = json.loads(p["val_ann"].read_text())
    ann["images"][0]["file_name"] = "missing.jpg"
    (root / "missing_image.json").write_text(json.dumps(ann))
    broken = root / "broken_images"
    broken.mkdir()
    for i, img in enumerate(sorted(p["val_images"].iterdir())):
        data = img.read_bytes()
        (broken / img.name).write_bytes(data[: len(data) // 2] if i == 0 else data)


PROGRESS = re.compile(r"\d+%\||\d+(it|img|batch|run)/s|\?(it|img|batch|run)/s")


def _run(args: list[str]) -> tuple[int, list[str], str]:
    """Exit code, the output lines a person reads (progress-bar frames dropped), the raw output."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    frames = [f for line in result.output.splitlines() for f in line.split("\r")]
    lines = [f for f in frames if f.strip() and not PROGRESS.search(f)]
    return result.exit_code, lines, result.output


def _expect_error(args: list[str], *needles: str, created: Path | None = None) -> None:
    code, lines, output = _run(args)
    assert code == 2, (args, output)
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, output)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if created is not None:
        assert not created.exists(), f"{created} left behind"
        leftovers = [f for f in created.parent.glob(f".{created.name}*")] if created.parent.exists() else []
        assert not leftovers, leftovers


CKPT_COMMANDS = {
    "inspect": lambda ck, out: ["inspect", ck, "--input-size", "64", "64", "--json"],
    "export": lambda ck, out: ["export", ck, "-o", out / "x.onnx", "--image-size", "64", "64"],
    "quantize": lambda ck, out: ["quantize", ck, "-o", out / "x.safetensors", "--calib",
                                 out / "shapes" / "val", "--image-size", "64", "64"],
    "build-engine": lambda ck, out: ["build-engine", ck, "-o", out / "x.qdtorch", "--backend", "torch",
                                     "--bits", "4"],
}


@pytest.mark.parametrize("command", sorted(CKPT_COMMANDS))
@pytest.mark.parametrize(("bad", "needle"), [("truncated.safetensors", "truncated"),
                                             ("random.pth", "checkpoint"),
                                             ("resnet18.pth", "not a DETR checkpoint"),
                                             ("nothere.safetensors", "not found")])
def test_bad_checkpoints(ws: dict[str, Path], command: str, bad: str, needle: str) -> None:
    root = ws["root"]
    args = CKPT_COMMANDS[command](root / bad, root)
    out = next((Path(a) for a in args if str(a).startswith(str(root / "x."))), None)
    if command == "build-engine" and bad == "random.pth":
        needle = ""  # the torch backend may read it as an ONNX file first; the file must still be named
    _expect_error(args, str(root / bad), needle, created=out)


def test_distill_and_train_with_bad_checkpoints(ws: dict[str, Path]) -> None:
    root = ws["root"]
    data = ["--images", ws["train_images"], "--ann", ws["train_ann"], "--image-size", "64",
            "--max-size", "64", "--max-steps", "1", "--no-progress", "--workers", "0"]
    _expect_error(["distill", ws["student"], "--fqm", "--teacher", root / "truncated.safetensors", *data,
                   "--output-dir", root / "d1"], str(root / "truncated.safetensors"))
    _expect_error(["distill", root / "random.pth", "--teacher", ws["teacher"], *data,
                   "--output-dir", root / "d2"], str(root / "random.pth"))
    _expect_error(["train", "--init", root / "resnet18.pth", *data,
                   "--output-dir", root / "t1"], str(root / "resnet18.pth"))


@pytest.mark.parametrize(("bad", "needle"), [("not_detr.onnx", "not a qdetr-deploy model"),
                                             ("random.onnx", "")])
def test_non_detr_onnx(ws: dict[str, Path], bad: str, needle: str) -> None:
    root = ws["root"]
    if bad == "random.onnx":  # not_detr.onnx has an image input: bench times it, no AP (test_bench_truth)
        _expect_error(["bench", root / bad, "--iters", "1", "--warmup", "0"], str(root / bad), needle)
    out = root / "x.ortengine"
    _expect_error(["build-engine", root / bad, "-o", out], str(root / bad), needle, created=out)


@pytest.mark.parametrize("bad", ["malformed.json", "empty.json"])
def test_bad_annotations(ws: dict[str, Path], bad: str) -> None:
    root, ann = ws["root"], ws["root"] / bad
    _expect_error(["evaluate", "--ann", ann, "--detections", ws["val_ann"]], str(ann))
    _expect_error(["evaluate", "--ann", ws["val_ann"], "--detections", ann], str(ann))
    _expect_error(["bench", ws["onnx"], "--images", ws["val_images"], "--ann", ann, "--iters", "1"], str(ann))
    _expect_error(["train", "--arch", "detr_tiny", "--images", ws["train_images"], "--ann", ann,
                   "--max-steps", "1", "--no-progress", "--workers", "0", "--output-dir", root / "t2"],
                  str(ann))


def test_missing_and_truncated_images(ws: dict[str, Path]) -> None:
    root = ws["root"]
    _expect_error(["bench", ws["onnx"], "--images", ws["val_images"], "--ann", root / "missing_image.json",
                   "--iters", "1", "--warmup", "0"], "missing.jpg")
    broken = sorted((root / "broken_images").iterdir())[0]
    _expect_error(["bench", ws["onnx"], "--images", root / "broken_images", "--ann", ws["val_ann"],
                   "--iters", "1", "--warmup", "0"], broken.name)
    _expect_error(["train", "--arch", "detr_tiny", "--images", root / "broken_images", "--ann", ws["val_ann"],
                   "--image-size", "64", "--max-size", "64", "--max-steps", "2", "--batch-size", "4",
                   "--no-progress", "--workers", "0", "--output-dir", root / "t3"], broken.name)
    out = root / "q_broken.safetensors"
    _expect_error(["quantize", ws["teacher"], "-o", out, "--calib", root / "broken_images", "--image-size",
                   "64", "64"], broken.name, created=out)


def test_impossible_options(ws: dict[str, Path]) -> None:
    root = ws["root"]
    out = root / "q.safetensors"
    _expect_error(["quantize", ws["teacher"], "-o", out, "--bits", "5-4-8", "--calib", ws["val_images"]],
                  "5", created=out)
    onnx_out = root / "o13.onnx"
    _expect_error(["export", ws["student"], "-o", onnx_out, "--opset", "13"], "opset", created=onnx_out)
    _expect_error(["bench", ws["onnx"], "--batch", "0"], "--batch")
    _expect_error(["bench", ws["onnx"], "--batch", "4", "--iters", "1", "--warmup", "0"], "batch")
    _expect_error(["train", "--arch", "detr_tiny", "--images", ws["train_images"], "--ann", ws["train_ann"],
                   "--batch-size", "0"], "--batch-size")
    _expect_error(["inspect", "--arch", "detr_tiny", "--bits", "4-4"], "4-4")
    _expect_error(["make-dataset", "circles", "--out", root / "c"], "circles")


def test_unwritable_outputs(ws: dict[str, Path]) -> None:
    for folder in (Path("/nonexistent_qdetr_dir"), Path(READ_ONLY)):
        _expect_error(["export", ws["student"], "-o", folder / "x.onnx", "--image-size", "64", "64"],
                      str(folder))
        _expect_error(["quantize", ws["teacher"], "-o", folder / "x.safetensors", "--calib", ws["val_images"],
                       "--image-size", "64", "64"], str(folder))
        _expect_error(["build-engine", ws["onnx"], "-o", folder / "x.ortengine"], str(folder))
    # make-dataset creates a missing output folder (mkdir -p), but not inside a read-only one
    _expect_error(["make-dataset", "shapes", "--out", Path(READ_ONLY) / "shapes"], READ_ONLY)


def test_killed_training_leaves_no_half_written_checkpoint_and_resumes(ws: dict[str, Path]) -> None:
    out = ws["root"] / "killed"
    base = [sys.executable, "-m", "qdetr_deploy", "train", "--arch", "detr_tiny",
            "--images", ws["train_images"], "--ann", ws["train_ann"], "--image-size", "64",
            "--max-size", "64", "--batch-size", "4",
            "--eval-every", "0", "--no-progress", "--workers", "0", "--output-dir", out]
    args = [str(a) for a in base + ["--epochs", "40"]]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # mid-run, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    first = load_checkpoint(ckpt)  # loads: never half-written
    steps_done = first.meta.get("step", 0)
    resumed = [str(a) for a in base] + ["--epochs", "40", "--max-steps", str(steps_done + 2), "--resume"]
    done = subprocess.run(resumed, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(ckpt).meta.get("step") == steps_done + 2


def test_resume_after_a_kill_between_checkpoint_and_state(ws: dict[str, Path]) -> None:
    """The race a kill can hit: checkpoint written, training state not. Resuming continues exactly."""
    import shutil

    from safetensors.torch import load_file

    def run(out: Path, steps: int, resume: bool) -> None:
        args = ["train", "--arch", "detr_tiny", "--images", ws["train_images"], "--ann", ws["train_ann"],
                "--image-size", "64", "--max-size", "64", "--batch-size", "4", "--epochs", "10",
                "--max-steps", str(steps), "--eval-every", "0", "--no-progress", "--workers", "0",
                "--output-dir", out] + (["--resume"] if resume else [])
        code, _, output = _run(args)
        assert code == 0, output

    straight, raced = ws["root"] / "straight", ws["root"] / "raced"
    run(straight, 4, False)
    run(raced, 2, False)
    shutil.copy(raced / "train_state.pt", ws["root"] / "state_at_2.pt")
    run(raced, 3, True)  # checkpoint and state at step 3 ...
    shutil.copy(ws["root"] / "state_at_2.pt", raced / "train_state.pt")  # ... as if killed before the state
    assert load_checkpoint(raced / "checkpoint.safetensors").meta["step"] == 3
    run(raced, 4, True)  # resumes from the state's step 2, not the checkpoint's 3
    a = load_file(str(straight / "checkpoint.safetensors"))
    b = load_file(str(raced / "checkpoint.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
