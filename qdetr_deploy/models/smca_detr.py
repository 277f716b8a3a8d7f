"""SMCA-DETR as released with Q-DETR (FIXTURE.md 4.9): sigmoid classification, boxes around the reference.

Keys match the released state dict 1:1 (``backbone.0.body.*``, ``input_proj``, ``query_embed`` [Nq, 2D] =
query_pos | initial tgt, ``transformer.*``, ``class_embed``, ``bbox_embed.layers.*``). The released forward's
side outputs (the second cross-attention pass "D" and hs[5] as a distillation feature) do not affect the
detections; D is dropped, hs is returned as with DETR.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Joiner
from .detr import MLP
from .smca_backbone import build_smca_backbone
from .smca_config import SMCAConfig
from .smca_transformer import SMCATransformer


def unpadded_sizes(images: Tensor, mask: Tensor | None) -> Tensor:
    """[B,2] (h, w) of each image without its bottom/right padding (mask True = padding)."""
    if mask is None:
        b, _, h, w = images.shape
        return torch.tensor([h, w], device=images.device).expand(b, 2)
    valid = ~mask  # [B,H,W]
    return torch.stack((valid.any(2).sum(1), valid.any(1).sum(1)), 1)


class SMCADETR(nn.Module):
    """forward(images [B,3,H,W], mask [B,H,W] | None, sizes [B,2] | None) -> dict:
    pred_logits [B,Nq,C+1] (sigmoid per class), pred_boxes [B,Nq,4] (cx,cy,w,h in [0,1]),
    aux_outputs (layers 0..L-2), hs [L,B,Nq,D]. ``sizes``: unpadded (h, w); by default read off the mask.
    """

    def __init__(self, backbone: Joiner, transformer: SMCATransformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, config: SMCAConfig | None = None) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.config = config

    def forward(self, images: Tensor, mask: Tensor | None = None, sizes: Tensor | None = None) -> dict:
        if sizes is None:
            sizes = unpadded_sizes(images, mask)
        features, feat_mask, pos = self.backbone(images, mask)  # [B,2048,h,w], [B,h,w], [B,D,h,w]
        hs, r = self.transformer(self.input_proj(features), feat_mask, self.query_embed.weight, pos, sizes)
        outputs_class = self.class_embed(hs)  # [L,B,Nq,C+1]
        box = self.bbox_embed(hs)  # [L,B,Nq,4]
        outputs_coord = torch.cat((box[..., :2] + r, box[..., 2:]), -1).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1].unbind(0), outputs_coord[:-1].unbind(0))]
        out["hs"] = hs
        return out


def build_smca_detr(cfg: SMCAConfig) -> SMCADETR:
    """An untrained SMCA-DETR from ``cfg`` (deterministic given ``torch.manual_seed``; no downloads)."""
    backbone = build_smca_backbone(cfg.backbone_layers, cfg.width_per_group, cfg.hidden_dim)
    transformer = SMCATransformer(cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers,
                                  cfg.dim_feedforward, cfg.dropout, cfg.smooth)
    return SMCADETR(backbone, transformer, cfg.num_classes, cfg.num_queries, cfg.aux_loss, cfg)
