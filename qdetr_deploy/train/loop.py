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

The pieces live beside this file, one concern each: ``config.py`` (TrainConfig, file names), ``datasets.py``
(sets and loaders), ``recipe.py`` (optimizer, scheduler, set loss), ``state.py`` (RNG and resume state),
``log.py`` (output folder, JSON-lines log), ``evaluation.py`` (COCO AP); this module runs the loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qdetr_deploy.checkpoints import save_checkpoint
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path
from qdetr_deploy.train import distributed as D
from qdetr_deploy.train.config import (
    CHECKPOINT_NAME,
    LABEL_MODES,
    LOG_NAME,
    STATE_FORMAT,
    STATE_NAME,
    TrainConfig,
    TrainResult,
)
from qdetr_deploy.train.datasets import Data, check_classes, load_data, train_loader, val_loader
from qdetr_deploy.train.evaluation import evaluate
from qdetr_deploy.train.log import JsonlLog, log_terms, prepare_output
from qdetr_deploy.train.recipe import SetLoss, build_optimizer, build_scheduler, set_criterion
from qdetr_deploy.train.state import read_resume_state, resume_model, rng_state, seed_all, set_rng_state

__all__ = [  # the loop's public names; the others are re-exported for callers of the former single module
    "CHECKPOINT_NAME", "LABEL_MODES", "LOG_NAME", "STATE_FORMAT", "STATE_NAME", "Data", "JsonlLog",
    "Objective", "SetLoss", "TrainConfig", "TrainResult", "build_optimizer", "build_scheduler",
    "check_classes", "evaluate", "fit", "load_data", "read_resume_state", "resume_model", "rng_state",
    "seed_all", "set_criterion", "set_rng_state", "train", "train_loader",
]

Objective = Callable[[nn.Module, Tensor, Tensor, list], tuple[Tensor, dict[str, Any]]]


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
        self.out = prepare_output(config, {"meta": meta}, state is not None, env)
        self.log = JsonlLog(self.out / LOG_NAME, env.is_main)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.loader, self.sampler = train_loader(data, config, env)
        self.val_loader = val_loader(data, config)
        self.pos = _Progress()
        if state is None:
            seed_all(config.seed + env.rank)
        self.ddp = D.wrap_ddp(self.model, objective, self.loader, config, env)
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
                                     D.to_device(targets, dev))
        if not torch.isfinite(loss):
            raise QDetrError(f"loss is {loss.item()} at step {self.pos.step + 1}: training diverged "
                             "(try a lower --lr or a tighter --clip-max-norm)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_max_norm or math.inf)
        self.optimizer.step()
        record = log_terms(loss, terms)
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
