"""Post-processing to detections, as in facebookresearch/detr ``PostProcess`` (ONNX-exportable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy


def postprocess(
    pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """pred_logits [B,Q,C+1], pred_boxes [B,Q,4] (normalised cx,cy,w,h), target_sizes [B,2] as (h, w)
    -> scores [B,Q], labels [B,Q] int64, boxes [B,Q,4] xyxy in pixels."""
    prob = F.softmax(pred_logits, -1)
    scores, labels = prob[..., :-1].max(-1)  # drop the no-object column
    boxes = box_cxcywh_to_xyxy(pred_boxes)
    img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B,4]
    return scores, labels, boxes * scale_fct[:, None, :]


class PostProcess(nn.Module):
    """Upstream's module: forward(outputs, target_sizes) -> one {"scores","labels","boxes"} dict per image."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        if len(outputs["pred_logits"]) != len(target_sizes):
            raise ValueError("target_sizes must have one (h, w) row per image")
        scores, labels, boxes = postprocess(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def sigmoid_topk(pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor, k: int | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SMCA-DETR's post-processing (released ``PostProcess``, ONNX-exportable): sigmoid over every one of
    the C slots (no "no object" column), top-k over the flattened [Q*C] scores of each image.

    pred_logits [B,Q,C], pred_boxes [B,Q,4] (cx,cy,w,h), target_sizes [B,2] (h, w); k defaults to Q.
    -> scores [B,k] (descending), labels [B,k] = index % C, boxes [B,k,4] xyxy in pixels of query
    index // C, flat index [B,k] = query * C + class. Equal scores may come in any order.
    """
    num_classes = pred_logits.shape[-1]
    k = pred_logits.shape[1] if k is None else k
    prob = pred_logits.sigmoid().flatten(1)  # [B,Q*C]
    scores, index = prob.topk(k, dim=1)
    labels = index % num_classes
    query = torch.div(index, num_classes, rounding_mode="floor")
    boxes = box_cxcywh_to_xyxy(pred_boxes).gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    img_h, img_w = target_sizes.to(boxes.dtype).unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B,4]
    return scores, labels, boxes * scale_fct[:, None, :], index
