"""Write an untrained DETR checkpoint of a preset with field overrides, for ``train --init``.

Usage: python benchmarks/make_init.py OUT.safetensors PRESET [FIELD=VALUE ...] [--seed N]
e.g. the ablation's teacher: ``make_init.py deep.safetensors detr_tiny enc_layers=4 dim_feedforward=768``
(a deeper, wider-FFN detr_tiny with the same hidden width and decoder depth, so DRD can compare features).
"""

from __future__ import annotations

import sys

import torch

from qdetr_deploy.checkpoints import save_checkpoint
from qdetr_deploy.models import build_detr, get_preset


def main(argv: list[str]) -> None:
    seed = 0
    if "--seed" in argv:
        i = argv.index("--seed")
        seed = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out, preset, *fields = argv
    overrides = {k: int(v) for k, v in (f.split("=", 1) for f in fields)}
    torch.manual_seed(seed)
    save_checkpoint(build_detr(get_preset(preset, **overrides)), out)
    print(f"{out}: {preset} {overrides}")


if __name__ == "__main__":
    main(sys.argv[1:])
