"""Distribution alignment (DA), Q-DETR's inner level (QDETR_METHOD.md §2).

``q* = gamma * (q - mu) / sqrt(sigma^2 + eps) + beta`` with statistics over the head dimension of each token
(per token, per head, unbiased variance). gamma (``scale``, shape [1,1,1,d]) and beta (``bias``, [d]) are
shared across heads, initialised to 1 and 0: the released code's names and shapes. DA depends on each
token's statistics, so it stays a float op at inference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def normalize_per_token(q: Tensor, eps: float = 1e-5) -> Tensor:
    """(q - mean) / sqrt(unbiased var + eps) over the last dimension. q: [B, h, L, d]."""
    d = q.shape[-1]
    centred = q - q.mean(dim=-1, keepdim=True)
    var = (centred * centred).sum(dim=-1, keepdim=True) / (d - 1)
    return centred / torch.sqrt(var + eps)


class DistributionAlignment(nn.Module):
    """Entropy-maximising rectification of attention queries before their 8-bit quantizer."""

    def __init__(self, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(1, 1, 1, head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim))

    def forward(self, q: Tensor) -> Tensor:  # q: [B, h, L, d]
        return self.scale * normalize_per_token(q, self.eps) + self.bias
