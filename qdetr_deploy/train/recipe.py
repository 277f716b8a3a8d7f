"""Upstream DETR's optimisation recipe: AdamW with a backbone learning rate, step decay, the set loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdetr_deploy.train.config import TrainConfig
from qdetr_deploy.train.criterion import SetCriterion, build_criterion
from qdetr_deploy.train.matcher import HungarianMatcher


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
