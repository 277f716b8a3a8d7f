"""The accuracy cost of the ONNX Runtime deployment preset (issue 13): AP50 of the distilled 4-4-8 student
with and without each quantization point of ``quantize --preset onnxruntime``, on the procedural shapes set.

Usage: python benchmarks/preset_accuracy.py [--out runs/preset_accuracy] [--teacher-steps N]
           [--student-steps N] [--seeds 1 2 3] [--configs paper onnxruntime ...] [--quick] [--summarize]

Stages (library API only; every stage resumes, finished runs are skipped):
1. the shapes set (``make_shapes_dataset``: 3 classes, 96x96, seed 0);
2. the full-precision teacher: a small DETR with a **resnet18** backbone (the preset's options only act on
   ResNet blocks) built from ``get_preset("detr_r18", ...)``, trained from scratch with the set loss
   (``train.loop.fit``, the loop behind ``train``). Upstream's backbone has frozen batch norm and a frozen
   stem and layer1, right for ImageNet weights but not from scratch (a first attempt that way, its frozen
   statistics set from one batch of images, stayed at AP50 0.03 after 900 steps, its class loss at the
   constant prior): here the backbone trains fully, with ordinary batch norm, as ``detr_tiny``'s does.
   The checkpoint holds the batch norm statistics and loads, like a pretrained ResNet, with frozen batch
   norm, which the students keep;
3. per config (``CONFIGS``) and seed: the teacher quantized 4-4-8 with that config on top of the paper's
   placement, no DA, calibrated LSQ+ on the first ``calib_size`` training images
   (``pipeline.quantize_checkpoint``, the same for every seed), then QAT for ``student_steps`` steps with
   the LSQ+ baseline objective (``train.distill.distill``, no DA, no FQM/DRD: distill's default), the seed
   setting the data order, so that runs of one seed are paired; COCO AP on the val split at the end.
4. ``results.json`` (every finished run, appended as it finishes), ``results.md`` (mean ± sample std over
   seeds, the paired difference against "paper" over the seeds both have) and ``preset_accuracy.png``.

Run order: the first two configs (priority 1: "paper" and "onnxruntime") seed by seed, so that an
interrupted study still has paired seeds; then every other config with all its seeds. Set
``OMP_NUM_THREADS=1`` (and ``nice``) on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

# config name -> QuantConfig fields on top of the paper's placement (QuantConfig.from_preset("paper", ...))
CONFIGS: dict[str, dict[str, Any]] = {
    "paper": {},
    "onnxruntime": {"residual_bits": 8, "conv_bias": "int32", "downsample_bits": 8,
                    "shared_block_input": True},
    "+conv_bias": {"conv_bias": "int32"},
    "+residual": {"residual_bits": 8},
    "+residual+shared": {"residual_bits": 8, "shared_block_input": True},
    "+downsample": {"downsample_bits": 8},
    "+input_proj": {"input_proj_bits": 8},
    # the preset since 2a2d510 (QuantConfig.PRESETS["onnxruntime"]): "onnxruntime" plus input_proj_bits
    "onnxruntime+input_proj": {"residual_bits": 8, "conv_bias": "int32", "downsample_bits": 8,
                               "shared_block_input": True, "input_proj_bits": 8},
}
# "onnxruntime" is the preset of the first run (commit 7f966e8), without input_proj_bits.
RESULTS = "results.json"


@dataclass
class Budget:
    num_train: int = 1200
    num_val: int = 200
    image_size: int = 96
    batch_size: int = 16
    teacher_steps: int = 1500
    teacher_lr: float = 3e-4
    student_steps: int = 150
    student_lr: float = 1e-4
    calib_size: int = 64

    @classmethod
    def quick(cls) -> Budget:
        return cls(num_train=32, num_val=16, batch_size=8, teacher_steps=4, student_steps=2, calib_size=8)


def _train_config(data: dict, out: Path, b: Budget, steps: int, lr: float, seed: int, eval_every: int,
                  progress: bool):
    from qdetr_deploy.train.config import TrainConfig

    per_epoch = max(1, b.num_train // b.batch_size)  # the loader drops the last partial batch
    epochs = -(-steps // per_epoch)
    return TrainConfig(images=str(data["train_images"]), ann=str(data["train_ann"]),
                       val_images=str(data["val_images"]), val_ann=str(data["val_ann"]), output_dir=str(out),
                       epochs=epochs, max_steps=steps, batch_size=b.batch_size, lr=lr, lr_backbone=lr,
                       weight_decay=1e-4, clip_max_norm=0.1, lr_drop=(max(1, round(epochs * 5 / 6)),),
                       image_size=b.image_size, scales=(b.image_size,), max_size=b.image_size, workers=0,
                       eval_every=eval_every, seed=seed, resume=True, progress=progress)


def _step_times(log: Path) -> float | None:
    """Median seconds of one optimizer step in a run's log (None without steps)."""
    records = map(json.loads, log.read_text().splitlines())
    times = [r["step_time"] for r in records if r.get("event") == "step"]
    return statistics.median(times) if times else None


def teacher_model():
    """The untrained resnet18 DETR, its backbone with trainable batch norm (see the module docstring)."""
    from torch import nn

    from qdetr_deploy.data import SHAPE_KINDS
    from qdetr_deploy.models import build_detr, get_preset
    from qdetr_deploy.models.backbone import FrozenBatchNorm2d

    cfg = get_preset("detr_r18", hidden_dim=96, nheads=3, enc_layers=2, dec_layers=2, dim_feedforward=384,
                     num_queries=10, num_classes=len(SHAPE_KINDS), class_names=list(SHAPE_KINDS), dropout=0.0)
    model = build_detr(cfg)
    for parent in list(model.backbone.modules()):
        for name, child in parent.named_children():
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel())
                bn.num_batches_tracked = None  # not in the checkpoint: it loads as FrozenBatchNorm2d
                setattr(parent, name, bn)
    model.backbone.requires_grad_(True)  # no pretrained weights: the stem and layer1 train too
    return model


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def train_teacher(data: dict, out: Path, b: Budget) -> dict:
    """Train the teacher from scratch (``train.loop.fit``, the set loss); resumes an interrupted run."""
    import torch

    from qdetr_deploy.io import write_json
    from qdetr_deploy.train import distributed as D
    from qdetr_deploy.train.loop import SetLoss, fit, load_data, read_resume_state, set_criterion

    marker = out / "teacher" / "done.json"
    if (done := _done(marker)) is not None:
        return done
    config = _train_config(data, out / "teacher", b, b.teacher_steps, b.teacher_lr, seed=0,
                           eval_every=4, progress=True)
    torch.manual_seed(0)
    model = teacher_model()
    state = read_resume_state(config)
    if state is not None:
        model.load_state_dict(state["model"])
    train_data = load_data(config, model.config.num_classes)
    criterion = set_criterion(train_data.num_classes, model.config.dec_layers, model.config.aux_loss, config)
    env = D.init_distributed(config.device)
    start = time.perf_counter()
    try:
        result = fit(model, train_data, SetLoss(criterion), config, {"stage": "train", "arch": "detr_r18 "
                     "(hidden 96, 3 heads, 2+2 layers, 10 queries; backbone batch norm trained)"}, env, state)
    finally:
        D.cleanup(env)
    done = {"checkpoint": str(result.checkpoint), "metrics": result.metrics, "step": result.step,
            "seconds": round(time.perf_counter() - start, 1), "step_time": _step_times(result.log)}
    write_json(marker, done)
    return done


def run_student(name: str, seed: int, data: dict, teacher: dict, out: Path, b: Budget) -> dict:
    """Quantize the teacher with config ``name`` (shared by every seed), QAT ``student_steps`` steps, AP."""
    from qdetr_deploy.pipeline import quantize_checkpoint
    from qdetr_deploy.train.distill import DistillConfig, distill

    init = out / "students" / f"{name}_init.safetensors"
    if not init.is_file():
        init.parent.mkdir(parents=True, exist_ok=True)
        quantize_checkpoint(teacher["checkpoint"], init, bits="4-4-8", calib=data["train_images"],
                            calib_size=b.calib_size, image_size=(b.image_size, b.image_size),
                            batch_size=b.batch_size, da="none", progress=False, preset="paper",
                            **CONFIGS[name])
    config = _train_config(data, out / "students" / name / f"seed{seed}", b, b.student_steps, b.student_lr,
                           seed=seed, eval_every=10**6, progress=False)  # at the end
    start = time.perf_counter()
    result = distill(str(init), teacher["checkpoint"], config, DistillConfig(fqm=False))  # the LSQ+ baseline
    return {"config": name, "seed": seed, "step": result.step, **{k: result.metrics[k] for k in
            ("AP", "AP50", "AP75")}, "seconds": round(time.perf_counter() - start, 1),
            "step_time": _step_times(result.log)}


def load_results(out: Path) -> list[dict]:
    path = out / RESULTS
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def check_budget(out: Path, b: Budget) -> None:
    """Refuse to mix runs of another budget into ``out``'s results (one line, exit code 2)."""
    from dataclasses import asdict

    from qdetr_deploy.errors import QDetrError

    path = out / RESULTS
    saved = json.loads(path.read_text())["budget"] if path.is_file() else asdict(b)
    if saved != asdict(b):
        changed = sorted(k for k in saved if saved[k] != asdict(b).get(k))
        raise QDetrError(f"results of another budget ({', '.join(changed)} differ): use another --out", path)


def save_results(out: Path, runs: list[dict], teacher: dict | None, b: Budget) -> None:
    from dataclasses import asdict

    from qdetr_deploy.io import write_json

    write_json(out / RESULTS, {"budget": asdict(b), "configs": CONFIGS, "teacher": teacher, "runs": runs})


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(runs: list[dict], order: list[str]) -> list[dict]:
    """Per config: AP50/AP per seed, mean ± std, paired AP50 difference against "paper" per seed."""
    by = {}
    for r in runs:
        by.setdefault(r["config"], {})[r["seed"]] = r
    rows = []
    for name in [c for c in order if c in by] + sorted(set(by) - set(order)):
        seeds = by[name]
        paper = by.get("paper", {})
        diffs = {s: seeds[s]["AP50"] - paper[s]["AP50"] for s in sorted(seeds) if s in paper}
        rows.append({"config": name, "seeds": sorted(seeds),
                     "AP50": {s: seeds[s]["AP50"] for s in sorted(seeds)},
                     "AP50_mean_std": _mean_std([seeds[s]["AP50"] for s in seeds]),
                     "AP_mean_std": _mean_std([seeds[s]["AP"] for s in seeds]),
                     "diff_AP50": diffs, "diff_AP50_mean_std": _mean_std(list(diffs.values())),
                     "step_time": statistics.fmean(seeds[s]["step_time"] for s in seeds)})
    return rows


def _pm(ms: tuple[float, float], sign: str = "") -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return f"{100 * m:{sign}.1f}" + ("" if math.isnan(s) else f" ± {100 * s:.1f}")


def table(rows: list[dict], teacher: dict | None) -> str:
    lines = ["AP x100 on the shapes val set (pycocotools). Mean ± sample std over seeds; Δ AP50 = paired "
             "difference against \"paper\" on the same seed (mean ± std of the differences, then per seed).",
             ""]
    if teacher and teacher.get("metrics"):
        t = teacher["metrics"]
        lines += [f"- teacher (full precision, {teacher['step']} steps): AP {100 * t['AP']:.1f}, "
                  f"AP50 {100 * t['AP50']:.1f}", ""]
    lines += ["| config | QuantConfig fields (on top of paper) | n | AP50 | AP | Δ AP50 vs paper | "
              "Δ AP50 per seed | s/step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fields = ", ".join(f"{k}={v}" for k, v in CONFIGS.get(r["config"], {}).items()) or "-"
        per_seed = ", ".join(f"{s}: {100 * d:+.1f}" for s, d in r["diff_AP50"].items())
        delta = "" if r["config"] == "paper" else _pm(r["diff_AP50_mean_std"], "+")
        lines.append(f"| {r['config']} | {fields} | {len(r['seeds'])} | {_pm(r['AP50_mean_std'])} | "
                     f"{_pm(r['AP_mean_std'])} | {delta} | {'' if r['config'] == 'paper' else per_seed} | "
                     f"{r['step_time']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], teacher: dict | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qdetr_deploy.io import atomic_path

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.6), dpi=90)
    for x, r in enumerate(rows):
        m, s = r["AP50_mean_std"]
        color = "tab:blue" if r["config"] == "paper" else "tab:orange" if r["config"] == "onnxruntime" \
            else "tab:gray"
        ax.errorbar([x], [100 * m], yerr=[0 if math.isnan(s) else 100 * s], fmt="o", color=color, capsize=3)
        ax.scatter([x + 0.08] * len(r["AP50"]), [100 * v for v in r["AP50"].values()], s=12, color=color,
                   alpha=0.6)
    if teacher and teacher.get("metrics"):
        ax.axhline(100 * teacher["metrics"]["AP50"], ls="--", color="k", lw=0.8, label="teacher (float)")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("AP50 (x100)")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_title("4-4-8 DETR-R18 on shapes: AP50 per config\n(mean ± std over seeds, dots = seeds)",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_summary(out: Path, configs: list[str], png: Path | None) -> str:
    path = out / RESULTS
    saved = json.loads(path.read_text()) if path.is_file() else {"runs": [], "teacher": None}
    rows = summarize(saved["runs"], configs)
    text = table(rows, saved["teacher"])
    from qdetr_deploy.io import atomic_path

    with atomic_path(out / "results.md", suffix=".md") as tmp:
        Path(tmp).write_text(text)
    if rows:
        plot(rows, saved["teacher"], png or out / "preset_accuracy.png")
    return text


def run_order(configs: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Priority 1 (the first two configs) seed by seed, then each other config with all its seeds."""
    first, rest = configs[:2], configs[2:]
    return [(c, s) for s in seeds for c in first] + [(c, s) for c in rest for s in seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/preset_accuracy"))
    ap.add_argument("--teacher-steps", type=int)
    ap.add_argument("--student-steps", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--png", type=Path, help="plot path [default: OUT/preset_accuracy.png]")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny set, a few steps")
    ap.add_argument("--summarize", action="store_true", help="only rewrite results.md and the plot")
    args = ap.parse_args()
    if args.quick and args.out == Path("runs/preset_accuracy"):
        args.out = Path("runs/preset_accuracy_quick")  # a smoke run never mixes with the study
    args.out.mkdir(parents=True, exist_ok=True)
    from qdetr_deploy.errors import QDetrError

    try:
        if not args.summarize:
            study(args)
        print(write_summary(args.out, args.configs, args.png))
    except QDetrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def study(args: argparse.Namespace) -> None:
    from qdetr_deploy.data import make_shapes_dataset

    b = Budget.quick() if args.quick else Budget()
    b.teacher_steps = args.teacher_steps or b.teacher_steps
    b.student_steps = args.student_steps or b.student_steps
    check_budget(args.out, b)
    data = make_shapes_dataset(args.out / "shapes", num_train=b.num_train, num_val=b.num_val,
                               image_size=b.image_size, seed=0, progress=False)
    teacher = train_teacher(data, args.out, b)
    tqdm.write(f"teacher: AP50 {teacher['metrics']['AP50']:.3f} after {teacher['step']} steps, "
               f"{teacher['step_time']:.2f} s/step")
    runs = load_results(args.out)
    save_results(args.out, runs, teacher, b)
    finished = {(r["config"], r["seed"]) for r in runs}
    todo = [(c, s) for c, s in run_order(args.configs, args.seeds) if (c, s) not in finished]
    for name, seed in tqdm(todo, desc="students", dynamic_ncols=True):
        run = run_student(name, seed, data, teacher, args.out, b)
        tqdm.write(f"{name} seed {seed}: AP50 {run['AP50']:.3f} ({run['seconds']} s, "
                   f"{run['step_time']:.2f} s/step)")
        runs.append(run)
        save_results(args.out, runs, teacher, b)


if __name__ == "__main__":
    main()
