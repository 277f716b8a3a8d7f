"""The training side: `train`, `distill` (Q-DETR), exact resume, and a 2-process gloo run under torchrun.

Everything runs on a 24-image, 64x64 procedural shapes set with detr_tiny for a handful of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qdetr_deploy.checkpoints import load_checkpoint
from qdetr_deploy.cli import cli
from qdetr_deploy.data import make_shapes_dataset
from qdetr_deploy.train.distill import split_budget
from qdetr_deploy.train.distributed import ShardedEpochSampler
from qdetr_deploy.train.loop import TrainConfig


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, num_train=24, num_val=8, image_size=64, progress=False)


def _data_args(shapes: dict[str, Path], val: bool = False) -> list[str]:
    args = ["--images", str(shapes["train_images"]), "--ann", str(shapes["train_ann"]), "--batch-size", "4",
            "--image-size", "64", "--max-size", "64", "--workers", "0", "--no-progress"]
    if val:
        args += ["--val-images", str(shapes["val_images"]), "--val-ann", str(shapes["val_ann"])]
    return args


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _steps(log: Path) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "step"]


@pytest.fixture(scope="module")
def teacher(shapes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    _run(["train", "--arch", "detr_tiny", *_data_args(shapes), "--max-steps", "2", "--output-dir", out])
    return out / "checkpoint.safetensors"


def test_train_writes_checkpoint_state_log_and_resumes_exactly(shapes: dict[str, Path],
                                                               tmp_path: Path) -> None:
    base = ["train", "--arch", "detr_tiny", *_data_args(shapes), "--lr-drop", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run([*base, "--max-steps", "8", "--output-dir", straight])
    out = _run([*base, "--max-steps", "3", "--output-dir", split, *_data_args(shapes, val=True)[-4:]])
    assert "val AP" in out
    state = torch.load(split / "train_state.pt", map_location="cpu", weights_only=True)
    assert (state["step"], state["epoch"], state["samples_in_epoch"]) == (3, 0, 12)
    assert load_checkpoint(split / "checkpoint.safetensors").meta["step"] == 3
    records = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3]
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "step_time"} <= set(records[0])
    assert any(r["event"] == "eval" and "AP50" in r for r in records)

    result = CliRunner().invoke(cli, [*base, "--max-steps", "8", "--output-dir", str(split)])
    assert result.exit_code == 2 and "--resume" in result.output  # refuses to overwrite a run
    _run([*base, "--max-steps", "8", "--output-dir", split, "--resume"])  # crosses an epoch and the lr drop
    a, b = _steps(straight / "log.jsonl"), _steps(split / "log.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert b[-1]["lr"] == pytest.approx(1e-5)
    wa, wb = load_file(straight / "checkpoint.safetensors"), load_file(split / "checkpoint.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("flags", [["--fqm", "--da", "self"], []], ids=["qdetr", "lsq-baseline-default"])
def test_distill_from_teacher_writes_quantized_checkpoint(shapes: dict[str, Path], teacher: Path,
                                                          tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "student"
    _run(["distill", "from-teacher", "--teacher", teacher, *_data_args(shapes), "--max-steps", "2",
          "--calib-batches", "1", "--output-dir", out, *flags])
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.quant_config is not None and ckpt.quant_config.bits == "4-4-8"
    assert ckpt.quant_config.da == ("self" if flags else "none")
    assert ckpt.meta["stage"] == "distill" and ckpt.meta["distill"]["fqm"] == bool(flags)
    steps = _steps(out / "log.jsonl")
    assert len(steps) == 2 and all(("loss_drd" in r) == bool(flags) for r in steps)


def test_distill_rejects_contradicting_student(shapes: dict[str, Path], teacher: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "s"
    _run(["distill", "from-teacher", "--teacher", teacher, *_data_args(shapes), "--max-steps", "1",
          "--calib-batches", "1", "--output-dir", out, "--no-fqm"])
    args = ["distill", str(out / "checkpoint.safetensors"), "--teacher", str(teacher), *_data_args(shapes),
            "--max-steps", "1", "--bits", "2-2-8", "--output-dir", str(tmp_path / "t")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "4-4-8" in result.output


def test_sharded_sampler_covers_epoch_and_skips_consumed() -> None:
    shards = [list(ShardedEpochSampler(10, True, 3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(i for s in shards for i, _ in s) == list(range(10))
    s = ShardedEpochSampler(10, True, 3, rank=0, world_size=1)
    full = list(s)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:] and len(s) == 6


def test_two_stage_budget_split(tmp_path: Path) -> None:
    cfg = TrainConfig(images="i", ann="a", epochs=300, lr_drop=(200,), output_dir=str(tmp_path))
    s1, s2 = split_budget(cfg, 0.5)
    assert (s1.epochs, s2.epochs, s1.lr_drop, s2.lr_drop) == (150, 150, (100,), (100,))
    assert Path(s1.output_dir) == tmp_path / "stage1" and Path(s2.output_dir) == tmp_path


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_gloo(shapes: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "qdetr_deploy", "train", "--arch", "detr_tiny", *_data_args(shapes, val=True),
           "--batch-size", "2", "--max-steps", "3", "--output-dir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint ") == 1  # rank 0 reports
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.meta["step"] == 3 and ckpt.category_ids == [1, 2, 3]
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["samples_in_epoch"] == 12
    assert [r["step"] for r in _steps(out / "log.jsonl")] == [1, 2, 3]


def test_decoder_capture_d_is_the_out_proj_input_and_changes_nothing() -> None:
    """--drd-feature d: the merged heads of Qa(A) Qa(v), the input of the cross-attention out_proj."""
    from qdetr_deploy.models import build_detr, get_preset
    from qdetr_deploy.quant import QuantConfig, quantize
    from qdetr_deploy.train.distill import DecoderCapture

    torch.manual_seed(0)
    model = quantize(build_detr(get_preset("detr_tiny")), QuantConfig.from_bits("4-4-8")).eval()
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ref = model(images, mask)
        cap = DecoderCapture(model, "d")
        cap.start()
        out = model(images, mask)
        d = cap.take()
        cap.remove()
        mha = model.transformer.decoder.layers[-1].multihead_attn
        # D of the last layer again, from the module's own steps, fed through out_proj: the layer's output
        rebuilt = mha.out_proj(d[-1].transpose(0, 1))
    assert torch.equal(out["pred_boxes"], ref["pred_boxes"]) and torch.equal(out["hs"], ref["hs"])
    assert d.shape == (2, 2, 10, 96)  # [L,B,Q,D]
    cross = DecoderCapture(model, "cross")
    cross.start()
    with torch.no_grad():
        model(images, mask)
    assert torch.allclose(cross.take()[-1], rebuilt.transpose(0, 1), atol=1e-5)  # ulps: matmul layout
    cross.remove()


def test_distill_options_d_feature_role_match_tau_none(shapes: dict[str, Path], teacher: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "student"
    _run(["distill", "from-teacher", "--teacher", teacher, *_data_args(shapes), "--max-steps", "2",
          "--calib-batches", "1", "--output-dir", out, "--fqm", "--drd-feature", "d", "--fqm-match", "role",
          "--tau", "none", "--drd-layers", "all"])
    meta = load_checkpoint(out / "checkpoint.safetensors").meta["distill"]
    assert meta["tau"] is None and meta["fqm_match"] == "role" and meta["drd_feature"] == "d"
    steps = _steps(out / "log.jsonl")
    assert all(r["drd_role_mismatch"] == 0 and r["drd_pairs"] >= 0 for r in steps)
    result = CliRunner().invoke(cli, ["distill", "from-teacher", "--teacher", str(teacher),
                                      *_data_args(shapes), "--tau", "1.5"])
    assert result.exit_code == 2 and "not in [0, 1)" in result.output
