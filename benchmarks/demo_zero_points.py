"""The demo's student with activation zero points fixed at 0 (``quantize --zero-points zero``), for
comparison with the demo's own student (learned zero points).

Reuses a finished demo work directory (its data and teacher) and the demo's stage settings: 64
calibration images, 1200 distillation steps, DA + FQM. Prints the student's COCO metrics (PyTorch
fake-quant on the validation images) as JSON. docs/BENCHMARKS.md, "Students for TensorRT".
Usage: ``python benchmarks/demo_zero_points.py DEMO_WORKDIR OUT_DIR`` (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qdetr_deploy import demo
from qdetr_deploy.pipeline import quantize_checkpoint
from qdetr_deploy.train.distill import DistillConfig, distill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_workdir", type=Path, help="a finished `qdetr-deploy demo --workdir` folder")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    s = demo.DemoSettings()
    data = json.loads((args.demo_workdir / "data.done.json").read_text())
    teacher = json.loads((args.demo_workdir / "teacher.done.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    init = quantize_checkpoint(teacher["checkpoint"], args.out / "student_init.safetensors", bits="4-4-8",
                               calib=data["train_images"], calib_size=s.calib_size,
                               image_size=(s.image_size, s.image_size), batch_size=8, da="self",
                               preset="paper", act_zero_point="zero", progress=False)
    steps = s.student_max_steps
    epochs = max(1, -(-steps * s.batch_size // s.num_train))
    config = demo._train_config(data, args.out / "student", s, steps, epochs)
    config.lr_backbone = config.lr = s.lr / 3  # as the demo's _quantize_and_distill
    print(json.dumps(demo._stats(distill(str(init), teacher["checkpoint"], config, DistillConfig(fqm=True)))))


if __name__ == "__main__":
    main()
