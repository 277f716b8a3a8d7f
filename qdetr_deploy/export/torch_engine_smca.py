"""The ``.qdtorch`` contract wrapper of the released Q-DETR SMCA-DETR (``qdetr_deploy.models.SMCADETR``).

The engine runs the model's own forward (one forward, not two): the converted model of
``export.torch_engine.convert_model`` with no mask, so every image fills the fixed (H, W) canvas, the
reference points are scaled by the canvas size and no key is padded. Post-processing is SMCA-DETR's
sigmoid top-k (``models.sigmoid_topk``, k = the number of queries): labels are the class slots, which are
COCO category ids for the released checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdetr_deploy.models.postprocess import sigmoid_topk
from qdetr_deploy.models.smca_detr import SMCADETR


class SMCAEngineModule(nn.Module):
    """``images [B,3,H,W]`` float32 -> ``(scores [B,k], labels [B,k], boxes [B,k,4])`` (canvas pixels, score
    descending). Always post-processed: raw ``pred_logits`` would be read with DETR's softmax rule by
    ``bench.preprocess``, which the metadata cannot tell apart."""

    def __init__(self, model: SMCADETR, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("canvas", torch.tensor([[int(size[0]), int(size[1])]]))  # int64

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images.to(self.model.query_embed.weight.dtype)  # float16 on CUDA engines
        out = self.model(x)  # no mask: unpadded size = canvas
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()  # [B,Q,C+1], [B,Q,4]
        scores, labels, boxes, _ = sigmoid_topk(logits, boxes, self.canvas.expand(x.shape[0], 2))
        return scores, labels, boxes
