"""``TrainConfig`` and ``TrainResult`` of the training loop, and the names of the files a run writes.

Torch-free (the CLI builds its options from here without importing torch). The files of ``output_dir``:
``checkpoint.safetensors`` (the model), ``train_state.pt`` (optimizer, scheduler, position, every rank's RNG
state: :mod:`qdetr_deploy.train.state`), ``log.jsonl`` (:mod:`qdetr_deploy.train.log`) and ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdetr_deploy.errors import QDetrError

STATE_FORMAT = "qdetr-train-state/1"
CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "train_state.pt"
LOG_NAME = "log.jsonl"
LABEL_MODES = ("auto", "contiguous", "category_id")
PAPER_TAU = 0.6  # FQM threshold of the Q-DETR paper (train.fqm)
PAPER_LAMBDA = 2.5  # weight of the DRD loss in the paper
MATCH_RULES = ("argmax", "role")  # FQM pairing rules (train.fqm): the paper's argmax, Hungarian roles


@dataclass
class TrainConfig:
    """Everything the loop needs; defaults are upstream DETR's (per-process batch 2, 300 epochs, drop 200).

    Budget: ``epochs`` and ``max_steps`` (None: no cap; at least one of them). ``eval_every``: epochs
    between evaluations; with a val set the run is also evaluated when the budget ends (0: never).
    Images: training shorter side drawn from ``scales`` (None: upstream's 480..800 when ``image_size`` is
    800, else ``(image_size,)``), longer side <= ``max_size``; evaluation at ``image_size``.
    ``random_crop``: upstream's crop branch (None: on when every scale is >= 384, i.e. off for small
    images). ``label_mode``: "contiguous" (classes 0..C-1), "category_id" (upstream COCO: class = category
    id) or "auto" (category_id only when the model's class count is max id + 1 and differs from the number
    of categories). ``find_unused_parameters``: DDP's flag; None finds out with one probe backward before
    wrapping.
    """

    images: str
    ann: str
    val_images: str | None = None
    val_ann: str | None = None
    output_dir: str = "runs/train"
    epochs: int | None = 300
    max_steps: int | None = None
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: tuple[int, ...] = (200,)
    lr_gamma: float = 0.1
    image_size: int = 800
    scales: tuple[int, ...] | None = None
    max_size: int = 1333
    random_crop: bool | None = None
    label_mode: str = "auto"
    on_bad_image: str = "fail"
    workers: int = 2
    seed: int = 42
    eval_every: int = 1
    keep_every: int = 0
    resume: bool = False
    device: str | None = None
    find_unused_parameters: bool | None = None
    deterministic: bool = False
    progress: bool = True
    eos_coef: float = 0.1
    loss_ce: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0

    def __post_init__(self) -> None:
        self.lr_drop = tuple(sorted(int(e) for e in self.lr_drop))
        self.scales = tuple(int(s) for s in self.scales) if self.scales else None
        checks = [
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.epochs is not None or self.max_steps is not None, "give epochs or max_steps (or both)"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.lr_backbone >= 0, "lr must be > 0 and lr_backbone >= 0"),
            (self.weight_decay >= 0 and self.clip_max_norm >= 0,
             "weight_decay and clip_max_norm must be >= 0"),
            (all(e >= 1 for e in self.lr_drop), f"lr_drop epochs must be >= 1, got {list(self.lr_drop)}"),
            (self.image_size >= 16 and self.max_size >= self.image_size,
             f"need 16 <= image_size <= max_size, got {self.image_size} and {self.max_size}"),
            (all(s >= 16 for s in self.scales or ()), "scales must be >= 16 pixels"),
            (self.label_mode in LABEL_MODES, f"label_mode must be one of {LABEL_MODES}"),
            (self.on_bad_image in ("fail", "skip"), "on_bad_image must be 'fail' or 'skip'"),
            (self.workers >= 0 and self.eval_every >= 0 and self.keep_every >= 0,
             "workers, eval_every and keep_every must be >= 0"),
            ((self.val_images is None) == (self.val_ann is None), "give both val images and val annotations"),
        ]
        for ok, message in checks:
            if not ok:
                raise QDetrError(message)

    def train_scales(self) -> tuple[int, ...]:
        if self.scales:
            return self.scales
        from qdetr_deploy.data.transforms import DEFAULT_SCALES  # torchvision: only when data is loaded

        return tuple(DEFAULT_SCALES) if self.image_size == 800 else (self.image_size,)

    def use_crop(self) -> bool:
        return min(self.train_scales()) >= 384 if self.random_crop is None else self.random_crop

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class TrainResult:
    """Where a run wrote its files, where it stopped and its last evaluation (None without a val set)."""

    output_dir: Path
    checkpoint: Path
    state: Path
    log: Path
    epoch: int
    step: int
    metrics: dict[str, float] | None
    rank: int = 0  # the process that returns it (only rank 0 wrote the files)
