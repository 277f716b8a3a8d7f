"""Hungarian matching of predictions to ground truth, as upstream DETR (``models/matcher.py``)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from qdetr_deploy.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``cost_class * (-p[target class]) + cost_bbox * L1(cxcywh)
    + cost_giou * (-GIoU)``. Returns, per image, ``(query indices, target indices)`` int64, sorted by
    query."""

    def __init__(self, cost_class: float = 1, cost_bbox: float = 5, cost_giou: float = 2) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrix(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
        """The cost of every (query, target) pair over the batch: ``[B, Q, sum of targets]`` on the CPU."""
        bs, nq = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(prob.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes).reshape(-1, 4)
        cost = self.cost_class * -prob[:, tgt_ids]
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = cost + self.cost_giou * -giou
        return cost.view(bs, nq, -1).cpu()

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> Indices:
        cost = self.cost_matrix(outputs, targets)
        if not torch.isfinite(cost).all():
            raise FloatingPointError("matching cost has NaN/inf: the predictions diverged")
        sizes = [len(t["boxes"]) for t in targets]
        out = []
        for b, c in enumerate(cost.split(sizes, -1)):
            i, j = linear_sum_assignment(c[b].numpy())
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out
