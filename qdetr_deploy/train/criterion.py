"""DETR's set loss (upstream ``models/detr.py: SetCriterion``): class CE with a down-weighted no-object
class, L1 and GIoU box losses on matched pairs, the same on every auxiliary decoder output (suffix ``_i``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from qdetr_deploy.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from qdetr_deploy.train.matcher import HungarianMatcher, Indices

LOSSES = ("labels", "boxes", "cardinality")


def _src_index(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def num_boxes_global(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Average number of target boxes per rank (all-reduced when distributed), at least 1."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        world = dist.get_world_size()
    return torch.clamp(n / world, min=1).item()


class SetCriterion(nn.Module):
    """Upstream's loss. ``forward`` returns unweighted terms; :meth:`total` applies ``weight_dict``."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, losses: Sequence[str] = LOSSES) -> None:
        super().__init__()
        unknown = set(losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; choose from {LOSSES}")
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, dict(weight_dict)
        self.eos_coef, self.losses = eos_coef, tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                    log: bool = True) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {logits.shape[-1]} columns, expected num_classes + 1 = "
                             f"{self.num_classes + 1}")
        idx = _src_index(indices)
        classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = classes_o
        out = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight.to(logits))}
        if log:
            out["class_error"] = 100 - _accuracy(logits[idx].detach(), classes_o)
        return out

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices,
                         num_boxes: float) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        card = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card.float(), lengths.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices,
                   num_boxes: float) -> dict[str, Tensor]:
        idx = _src_index(indices)
        src = outputs["pred_boxes"][idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(src)
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": l1, "loss_giou": (1 - giou).sum() / num_boxes}

    def get_loss(self, name: str, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                 **kwargs) -> dict[str, Tensor]:
        fn = {"labels": self.loss_labels, "boxes": self.loss_boxes, "cardinality": self.loss_cardinality}
        return fn[name](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_boxes = num_boxes_global(targets, outputs["pred_logits"].device)
        indices = self.matcher(main, targets)
        losses: dict[str, Tensor] = {}
        for name in self.losses:
            losses.update(self.get_loss(name, main, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            indices = self.matcher(aux, targets)
            for name in self.losses:
                kwargs = {"log": False} if name == "labels" else {}
                terms = self.get_loss(name, aux, targets, indices, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in terms.items()})
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the terms that have a weight (logging terms have none)."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


@torch.no_grad()
def _accuracy(logits: Tensor, target: Tensor) -> Tensor:
    if target.numel() == 0:
        return torch.zeros([], device=logits.device)
    return (logits.argmax(-1) == target).float().mean() * 100


def build_criterion(num_classes: int, ce: float = 1, bbox: float = 5, giou: float = 2, eos_coef: float = 0.1,
                    aux_layers: int = 5, matcher: HungarianMatcher | None = None,
                    ) -> tuple[SetCriterion, dict[str, float]]:
    """Upstream's set-up: weights for the final output and ``aux_layers`` copies with suffix ``_0..``.

    ``aux_layers`` is L - 1 for an L-layer decoder with auxiliary losses (0 without). The matcher defaults to
    costs (class 1, bbox 5, giou 2), upstream's defaults.
    """
    base = {"loss_ce": float(ce), "loss_bbox": float(bbox), "loss_giou": float(giou)}
    weight_dict = dict(base)
    for i in range(aux_layers):
        weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    criterion = SetCriterion(num_classes, matcher or HungarianMatcher(), weight_dict, eos_coef=eos_coef)
    return criterion, weight_dict
