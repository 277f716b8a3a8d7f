"""DETR, as in facebookresearch/detr ``models/detr.py`` (the detector; criterion and matcher: train/)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Joiner, build_backbone
from .config import DetrConfig
from .transformer import Transformer, build_transformer


class MLP(nn.Module):
    """A simple multi-layer perceptron (a.k.a. FFN): ReLU between the ``layers``, none after the last."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class DETR(nn.Module):
    """The DETR detector.

    forward(images [B,3,H,W], mask [B,H,W] bool (True = padding) | None) -> dict:
      pred_logits [B,Q,C+1] (last class = no object), pred_boxes [B,Q,4] (normalised cx,cy,w,h),
      aux_outputs (decoder layers 0..L-2, when ``aux_loss``), hs [L,B,Q,D].
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss: bool = False,
        config: DetrConfig | None = None,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.config = config

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        features, mask, pos = self.backbone(images, mask)  # [B,C,h,w], [B,h,w], [B,D,h,w]
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)[0]  # [L,B,Q,D]
        outputs_class = self.class_embed(hs)  # [L,B,Q,C+1]
        outputs_coord = self.bbox_embed(hs).sigmoid()  # [L,B,Q,4]
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        out["hs"] = hs
        return out

    @staticmethod
    def _set_aux_loss(outputs_class: Tensor, outputs_coord: Tensor) -> list[dict[str, Tensor]]:
        return [
            {"pred_logits": a, "pred_boxes": b}
            for a, b in zip(outputs_class[:-1].unbind(0), outputs_coord[:-1].unbind(0))
        ]


def build_detr(cfg: DetrConfig, *, train_backbone: bool = True) -> DETR:
    """Build an untrained DETR from ``cfg`` (deterministic given ``torch.manual_seed``; no downloads).

    ``train_backbone`` is upstream's ``lr_backbone > 0``: ResNets then train layer2-4 only.
    """
    backbone = build_backbone(
        cfg.backbone, cfg.hidden_dim, train_backbone=train_backbone, dilation=cfg.dilation
    )
    transformer = build_transformer(
        cfg.hidden_dim, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout
    )
    return DETR(backbone, transformer, cfg.num_classes, cfg.num_queries, aux_loss=cfg.aux_loss, config=cfg)
