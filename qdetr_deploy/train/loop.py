"""The one training loop behind ``train`` (DETR set loss) and ``distill`` (set loss + lambda * DRD).

Recipe (upstream DETR, the Q-DETR paper §4): AdamW with a separate backbone learning rate, weight decay on
every parameter, gradient clipping by global norm, the learning rate multiplied by ``lr_gamma`` at each epoch
of ``lr_drop`` (upstream's StepLR at 200 is ``lr_drop=(200,)``; the paper's COCO 500-epoch schedule is
``(200, 400)``). The budget is ``epochs`` or ``max_steps`` (optimizer steps), whichever ends first.

Every epoch (and when the budget ends mid-epoch) rank 0 writes, in ``output_dir``:
- ``checkpoint.safetensors``: the model (``save_checkpoint``; quantized models keep their QuantConfig);
  ``meta`` holds the epoch, step and latest metrics;
- ``train_state.pt``: a copy of the model weights (a run killed between the two writes resumes exactly
  from this file), optimizer, scheduler, epoch, step, samples consumed in the epoch and every rank's RNG
  states, plain tensors and containers only (``torch.load(weights_only=True)`` reads it), written atomically
  after the checkpoint; ``--resume`` checks both name the same step and continues exactly: the sampler skips
  what the epoch already consumed and augmentation is seeded per sample (``distributed.SeededDataset``);
- ``log.jsonl``: one JSON object per line: ``{"event": "step", ...}`` (loss terms of the final decoder
  layer, total loss, lr, grad norm, step and data time; averaged over ranks), ``{"event": "eval", ...}``
  (COCO AP etc. on the val set) and ``{"event": "epoch", ...}``. A resumed run drops lines past the saved
  step first, so the log reads as one run;
- ``config.json``: the TrainConfig (and the caller's extra settings).

Evaluation: predictions in original image pixels (``postprocess`` with ``orig_size``) become COCO results
(category ids through the dataset's ``category_ids``), gathered from every rank, de-duplicated by image id
and scored by ``bench.cocoeval.evaluate_coco`` on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from qdetr_deploy.checkpoints import save_checkpoint
from qdetr_deploy.data import CocoDetection, collate_fn, make_eval_transforms, make_train_transforms
from qdetr_deploy.data.transforms import DEFAULT_SCALES
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path, write_json
from qdetr_deploy.models import postprocess
from qdetr_deploy.train import distributed as D
from qdetr_deploy.train.criterion import SetCriterion, build_criterion
from qdetr_deploy.train.matcher import HungarianMatcher

STATE_FORMAT = "qdetr-train-state/1"
CHECKPOINT_NAME = "checkpoint.safetensors"
STATE_NAME = "train_state.pt"
LOG_NAME = "log.jsonl"
LABEL_MODES = ("auto", "contiguous", "category_id")
Objective = Callable[[nn.Module, Tensor, Tensor, list], tuple[Tensor, dict[str, Any]]]


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


@dataclass
class Data:
    """The datasets of a run and the class mapping the checkpoint records."""

    train: CocoDetection
    val: CocoDetection | None
    label_mode: str

    @property
    def category_ids(self) -> list[int]:
        return list(self.train.category_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.train.class_names)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


# -- data ----------------------------------------------------------------------------------------------
def load_data(config: TrainConfig, model_classes: int | None = None) -> Data:
    """Training (and validation) sets with the resolved label mode (see ``TrainConfig.label_mode``).

    ``model_classes``: the class count of the model to be trained, when it is fixed (for "auto")."""
    mode = "contiguous" if config.label_mode == "auto" else config.label_mode
    train_tf = make_train_transforms(config.train_scales(), config.max_size,
                                     crop=(384, 600) if config.use_crop() else None)
    ds = CocoDetection(config.images, config.ann, train_tf, mode, config.on_bad_image)
    if config.label_mode == "auto" and model_classes is not None and model_classes != ds.num_classes:
        if model_classes == max(ds.category_ids) + 1:
            mode = "category_id"
            ds = CocoDetection(config.images, config.ann, train_tf, mode, config.on_bad_image)
    val = None
    if config.val_images is not None:
        val = CocoDetection(config.val_images, config.val_ann, make_eval_transforms(config.image_size,
                            config.max_size), mode, config.on_bad_image)
        if val.category_ids != ds.category_ids:
            raise QDetrError("the validation set has other categories than the training set", config.val_ann)
    return Data(ds, val, mode)


def check_classes(model_classes: int, data: Data, config: TrainConfig) -> None:
    if model_classes != data.num_classes:
        raise QDetrError(f"the model has {model_classes} classes but the training set has {data.num_classes} "
                         f"({data.label_mode} labels)", config.ann)


def train_loader(data: Data, config: TrainConfig, env: D.DistEnv) -> tuple[DataLoader, D.ShardedEpochSampler]:
    """The training loader (seeded per sample, sharded over ranks, last partial batch dropped)."""
    sampler = D.ShardedEpochSampler(len(data.train), True, config.seed, env.rank, env.world_size)
    if len(sampler) < config.batch_size:
        raise QDetrError(f"{len(data.train)} training images are fewer than batch size {config.batch_size} x "
                         f"{env.world_size} processes", config.ann)
    loader = DataLoader(D.SeededDataset(data.train), batch_size=config.batch_size, sampler=sampler,
                        drop_last=True, collate_fn=collate_fn, num_workers=config.workers,
                        persistent_workers=config.workers > 0, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    return loader, sampler


def _val_loader(data: Data, config: TrainConfig) -> DataLoader | None:
    if data.val is None:
        return None
    return DataLoader(data.val, batch_size=config.batch_size, sampler=D.distributed_sampler(data.val),
                      collate_fn=collate_fn, num_workers=min(config.workers, 2))


# -- optimisation --------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: ``backbone.*`` at ``lr_backbone`` (frozen when 0), the rest at ``lr``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if name.startswith("backbone.") and config.lr_backbone == 0:
            p.requires_grad_(False)
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": config.lr, "name": "main"}]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr_backbone, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate times ``lr_gamma`` at each epoch of ``lr_drop`` (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_drop), gamma=config.lr_gamma)


def set_criterion(num_classes: int, dec_layers: int, aux_loss: bool, config: TrainConfig) -> SetCriterion:
    """Upstream's set loss and matcher (costs class 1, L1 5, GIoU 2) with the config's loss weights."""
    matcher = HungarianMatcher(1, 5, 2)
    criterion, _ = build_criterion(num_classes, config.loss_ce, config.loss_bbox, config.loss_giou,
                                   config.eos_coef, dec_layers - 1 if aux_loss else 0, matcher)
    return criterion


class SetLoss:
    """The ``train`` objective: DETR's set loss (``SetCriterion``) on the model's outputs."""

    def __init__(self, criterion: SetCriterion) -> None:
        self.criterion = criterion

    def __call__(self, model: nn.Module, images: Tensor, mask: Tensor, targets: list) -> tuple[Tensor, dict]:
        terms = self.criterion(model(images, mask), targets)
        return self.criterion.total(terms), terms


# -- seeding and RNG state -----------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's generator states as plain containers and tensors (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- output folder, resume -----------------------------------------------------------------------------
def read_resume_state(config: TrainConfig) -> dict[str, Any] | None:
    """The saved state of ``output_dir`` when resuming; refuses to overwrite a run without ``resume``."""
    path = Path(config.output_dir) / STATE_NAME
    if not path.is_file():
        return None
    if not config.resume:
        raise QDetrError("the output folder already holds a training run: pass --resume to continue it or "
                         "choose another --output-dir", config.output_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is one user-facing error
        raise QDetrError(f"unreadable training state ({type(e).__name__}: {e})", path) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise QDetrError(f"not a training state file (format {STATE_FORMAT} expected)", path)
    return state


def resume_model(ckpt: Any, state: dict[str, Any]) -> nn.Module:
    """The model at the training state's step.

    A save writes the checkpoint, then the training state (which carries its own copy of the weights). A run
    killed between the two leaves a checkpoint one save ahead: the state's weights win, so the run resumes
    exactly from the state's step.
    """
    from qdetr_deploy.checkpoints import load_state

    if ckpt.meta.get("step") == state["step"]:
        return ckpt.model
    if "model" not in state:
        raise QDetrError(f"checkpoint is at step {ckpt.meta.get('step')} but {STATE_NAME} at step "
                         f"{state['step']} (a save was interrupted): cannot resume exactly", ckpt.path)
    load_state(ckpt.model, state["model"], ckpt.path)
    return ckpt.model


def _prepare_output(config: TrainConfig, extra: dict[str, Any], resumed: bool, env: D.DistEnv) -> Path:
    out = Path(config.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"train": config.to_dict(), **extra})
        if not resumed and (out / LOG_NAME).exists():
            (out / LOG_NAME).unlink()
    D.barrier()
    return out


class JsonlLog:
    """Append-only JSON-lines log (rank 0); ``truncate(step)`` drops lines written after ``step``."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# -- evaluation ----------------------------------------------------------------------------------------
def _detections(outputs: dict, targets: list[dict], category_ids: list[int], valid: set[int]) -> dict:
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    scores, labels, boxes = postprocess(outputs["pred_logits"], outputs["pred_boxes"], sizes)
    per_image: dict[int, list[dict]] = {}
    for t, s, lab, b in zip(targets, scores.cpu(), labels.cpu(), boxes.cpu()):
        dets = per_image.setdefault(int(t["image_id"]), [])
        for score, label, (x0, y0, x1, y1) in zip(s.tolist(), lab.tolist(), b.tolist()):
            cat = category_ids[label]
            if cat in valid:
                dets.append({"image_id": int(t["image_id"]), "category_id": cat,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return per_image


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ann_file: str, category_ids: list[int],
             class_names: list[str], device: torch.device, progress: bool = False) -> dict[str, float]:
    """COCO bbox AP of ``model`` on ``loader``'s images (every rank runs its share; all get the result)."""
    from qdetr_deploy.bench.cocoeval import evaluate_coco  # no torch in there: safe to import lazily

    was_training = model.training
    model.eval()
    valid = {c for c, n in zip(category_ids, class_names) if n != "N/A"}
    per_image: dict[int, list[dict]] = {}
    for images, mask, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        out = model(images.to(device), mask.to(device))
        for image_id, dets in _detections(out, targets, category_ids, valid).items():
            per_image.setdefault(image_id, dets)
    model.train(was_training)
    gathered = D.all_gather_object(per_image)
    metrics = None
    if D.is_main_process():
        merged: dict[int, list[dict]] = {}
        for part in gathered:
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        result = evaluate_coco(ann_file, [d for dets in merged.values() for d in dets], sorted(merged))
        metrics = dict(zip(result["names"], result["stats"]))
    return D.broadcast_object(metrics)


# -- the loop ------------------------------------------------------------------------------------------
def _probe_unused(model: nn.Module, objective: Objective, loader: DataLoader, device: torch.device) -> bool:
    """One forward/backward before DDP wrapping: True when some trainable parameter gets no gradient."""
    buffers = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    images, mask, targets = next(iter(loader))
    loss, _ = objective(model, images.to(device), mask.to(device), _to_device(targets, device))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(buffers)
    return any(D.all_gather_object(bool(unused)))


def _wrap(model: nn.Module, objective: Objective, loader: DataLoader, config: TrainConfig,
          env: D.DistEnv) -> nn.Module:
    if not env.distributed:
        return model
    find_unused = config.find_unused_parameters
    if find_unused is None:
        find_unused = _probe_unused(model, objective, loader, env.device)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


_AUX = re.compile(r"_\d+$")


def _log_terms(loss: Tensor, terms: dict[str, Any]) -> dict[str, float]:
    """Final-layer terms (aux copies dropped) and the total, averaged over ranks."""
    keys = [k for k in terms if not _AUX.search(k)]

    def scalar(v: Any) -> Tensor:
        return torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach().reshape(())

    values = torch.stack([scalar(loss)] + [scalar(terms[k]) for k in keys])
    values = D.all_reduce_mean(values).tolist()
    return dict(zip(["loss"] + keys, values))


@dataclass
class _Progress:
    """Where the loop stands: completed epochs, optimizer steps, samples consumed in the current epoch."""

    epoch: int = 0
    step: int = 0
    start: int = 0
    metrics: dict[str, float] | None = None
    metrics_step: int = -1


class _Run:
    """One call of :func:`fit`: the pieces it wires together and the small steps it runs."""

    def __init__(self, model: nn.Module, data: Data, objective: Objective, config: TrainConfig,
                 meta: dict[str, Any], env: D.DistEnv, state: dict[str, Any] | None) -> None:
        self.model, self.data, self.objective, self.config = model.to(env.device), data, objective, config
        self.meta, self.env = meta, env
        self.out = _prepare_output(config, {"meta": meta}, state is not None, env)
        self.log = JsonlLog(self.out / LOG_NAME, env.is_main)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.loader, self.sampler = train_loader(data, config, env)
        self.val_loader = _val_loader(data, config)
        self.pos = _Progress()
        if state is None:
            seed_all(config.seed + env.rank)
        self.ddp = _wrap(self.model, objective, self.loader, config, env)
        if state is not None:
            self._restore(state)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.pos = _Progress(state["epoch"], state["step"], state["samples_in_epoch"], state.get("metrics"),
                             state.get("metrics_step", -1))
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            set_rng_state(rngs[self.env.rank])
        else:
            seed_all(self.config.seed + self.env.rank + 7919 * self.pos.step)
            self.say(f"resuming with {self.env.world_size} processes instead of {len(rngs)}: RNG reseeded")
        self.log.truncate(self.pos.step)
        self.say(f"resumed from {self.out / STATE_NAME}: epoch {self.pos.epoch}, step {self.pos.step}")

    def say(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message)

    def budget_left(self) -> bool:
        epochs, cap = self.config.epochs, self.config.max_steps
        return (epochs is None or self.pos.epoch < epochs) and (cap is None or self.pos.step < cap)

    def train_step(self, images: Tensor, mask: Tensor, targets: list) -> dict[str, float]:
        dev = self.env.device
        loss, terms = self.objective(self.ddp, images.to(dev, non_blocking=True), mask.to(dev),
                                     _to_device(targets, dev))
        if not torch.isfinite(loss):
            raise QDetrError(f"loss is {loss.item()} at step {self.pos.step + 1}: training diverged "
                             "(try a lower --lr or a tighter --clip-max-norm)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_max_norm or math.inf)
        self.optimizer.step()
        record = _log_terms(loss, terms)
        record["grad_norm"] = float(norm)
        return record

    def run_epoch(self) -> bool:
        """Train until the epoch or the step budget ends; True when the epoch was completed."""
        self.ddp.train()
        self.sampler.set_epoch(self.pos.epoch, self.pos.start)
        total, done = len(self.loader), 0
        bar = tqdm(total=total, desc=f"epoch {self.pos.epoch + 1}", leave=False,
                   disable=not (self.env.is_main and self.config.progress), dynamic_ncols=True)
        t_data = time.perf_counter()
        for images, mask, targets in self.loader:
            t_step = time.perf_counter()
            record = self.train_step(images, mask, targets)
            self.pos.step += 1
            self.pos.start += self.config.batch_size * self.env.world_size
            done += 1
            now = time.perf_counter()
            lrs = {"lr" if g["name"] == "main" else f"lr_{g['name']}": g["lr"]
                   for g in self.optimizer.param_groups}
            self.log.write({"event": "step", "epoch": self.pos.epoch, "step": self.pos.step, **lrs, **record,
                            "step_time": now - t_step, "data_time": t_step - t_data})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", step=self.pos.step, refresh=False)
            t_data = time.perf_counter()
            if not self.budget_left() and done < total:
                break
        bar.close()
        return done >= total

    def due_eval(self, epoch_done: bool) -> bool:
        every = self.config.eval_every
        if self.val_loader is None or every == 0 or self.pos.metrics_step == self.pos.step:
            return False
        return not self.budget_left() or (epoch_done and self.pos.epoch % every == 0)

    def run_eval(self) -> None:
        c = self.config
        metrics = evaluate(self.model, self.val_loader, c.val_ann, self.data.category_ids,
                           self.data.class_names, self.env.device, self.env.is_main and c.progress)
        self.pos.metrics, self.pos.metrics_step = metrics, self.pos.step
        self.log.write({"event": "eval", "epoch": self.pos.epoch, "step": self.pos.step, **metrics})
        self.say(f"eval epoch {self.pos.epoch} step {self.pos.step}: AP {metrics['AP']:.4f} "
                 f"AP50 {metrics['AP50']:.4f} AP75 {metrics['AP75']:.4f}")

    def save(self) -> None:
        """Checkpoint + training state (all ranks call: the RNG states are gathered)."""
        rngs = D.all_gather_object(rng_state())
        if self.env.is_main:
            p = self.pos
            meta = {**self.meta, "epoch": p.epoch, "step": p.step, "metrics": p.metrics}
            save_checkpoint(self.model, self.out / CHECKPOINT_NAME, self.data.category_ids, meta)
            keep = self.config.keep_every
            if keep and p.start == 0 and p.epoch % keep == 0:
                save_checkpoint(self.model, self.out / f"checkpoint_epoch{p.epoch:04d}.safetensors",
                                self.data.category_ids, meta)
            state = {"format": STATE_FORMAT, "epoch": p.epoch, "step": p.step, "samples_in_epoch": p.start,
                     "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "rng": rngs, "metrics": p.metrics, "metrics_step": p.metrics_step,
                     "world_size": self.env.world_size, "config": self.config.to_dict()}
            with atomic_path(self.out / STATE_NAME, suffix=".pt") as tmp:
                torch.save(state, tmp)
        D.barrier()

    def run(self) -> TrainResult:
        saved_step = self.pos.step if self.pos.step else -1
        while self.budget_left():
            t0, step0 = time.perf_counter(), self.pos.step
            epoch_done = self.run_epoch()
            if epoch_done:
                self.scheduler.step()
                self.pos.epoch, self.pos.start = self.pos.epoch + 1, 0
            if self.due_eval(epoch_done):
                self.run_eval()
            self.log.write({"event": "epoch", "epoch": self.pos.epoch, "step": self.pos.step,
                            "epoch_time": time.perf_counter() - t0, "steps": self.pos.step - step0})
            self.say(f"epoch {self.pos.epoch}: step {self.pos.step} ({time.perf_counter() - t0:.1f}s)")
            self.save()
            saved_step = self.pos.step
        if self.due_eval(True):
            self.run_eval()
            saved_step = -1
        if saved_step != self.pos.step:
            self.save()
        out = self.out
        return TrainResult(out, out / CHECKPOINT_NAME, out / STATE_NAME, out / LOG_NAME, self.pos.epoch,
                           self.pos.step, self.pos.metrics, self.env.rank)


def fit(model: nn.Module, data: Data, objective: Objective, config: TrainConfig, meta: dict[str, Any],
        env: D.DistEnv, state: dict[str, Any] | None = None) -> TrainResult:
    """Train ``model`` (already loaded, quantized and calibrated as wanted) with ``objective``.

    ``objective(model, images, mask, targets) -> (loss, terms)`` is called with the DDP-wrapped model.
    ``state``: a training state from :func:`read_resume_state` (the model must already hold the matching
    checkpoint). ``meta`` goes into every checkpoint's metadata.
    """
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return _Run(model, data, objective, config, meta, env, state).run()


# -- the `train` command -------------------------------------------------------------------------------
def _fit_head(model: nn.Module, data: Data, say: Callable[[str], None]) -> None:
    """Give an ``--init`` model the training set's classes (a fresh class head when the counts differ)."""
    cfg = model.config
    if cfg.num_classes != data.num_classes:
        say(f"init checkpoint has {cfg.num_classes} classes, the training set {data.num_classes}: "
            "new class head")
        model.class_embed = nn.Linear(model.class_embed.in_features, data.num_classes + 1)
    model.config = dataclasses.replace(cfg, num_classes=data.num_classes, class_names=data.class_names)


def _new_model(arch: str, init: str | None, data_cfg: TrainConfig, trust: bool, env: D.DistEnv
               ) -> tuple[nn.Module, Data]:
    from qdetr_deploy.checkpoints import load_checkpoint
    from qdetr_deploy.models import build_detr, get_preset

    if init is not None:
        model = load_checkpoint(init, trust=trust).model
        data = load_data(data_cfg, model.config.num_classes)
        _fit_head(model, data, lambda m: env.is_main and tqdm.write(m))
        return model, data
    data = load_data(data_cfg)
    try:
        cfg = get_preset(arch, num_classes=data.num_classes, class_names=data.class_names)
    except KeyError as e:
        raise QDetrError(str(e.args[0])) from None
    return build_detr(cfg, train_backbone=data_cfg.lr_backbone > 0), data


def train(config: TrainConfig, arch: str = "detr_r50", init: str | None = None,
          trust: bool = False) -> TrainResult:
    """Train a DETR (float, or quantized when ``init`` is a quantized checkpoint) with the set loss.

    The model is ``init`` (ours or upstream DETR; a class head of another size is replaced) or a fresh
    ``arch`` preset sized to the training set's classes; ``config.resume`` continues ``output_dir``'s run.
    Run under ``torchrun`` for several processes (see :mod:`qdetr_deploy.train.distributed`).
    """
    from qdetr_deploy.checkpoints import load_checkpoint

    env = D.init_distributed(config.device)
    try:
        seed_all(config.seed)
        state = read_resume_state(config)
        if state is not None:
            ckpt = load_checkpoint(Path(config.output_dir) / CHECKPOINT_NAME)
            model = resume_model(ckpt, state)
            data = load_data(config, model.config.num_classes)
            check_classes(model.config.num_classes, data, config)
        else:
            if config.resume and env.is_main:
                tqdm.write(f"no training state in {config.output_dir}: starting a new run")
            model, data = _new_model(arch, init, config, trust, env)
        criterion = set_criterion(data.num_classes, model.config.dec_layers, model.config.aux_loss, config)
        meta = {"stage": "train", "arch": arch if init is None else None, "init": init}
        return fit(model, data, SetLoss(criterion), config, meta, env, state)
    finally:
        D.cleanup(env)
