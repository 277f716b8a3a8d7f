"""Multi-head attention with upstream ``nn.MultiheadAttention`` parameter names and explicit steps.

The forward is ``project`` -> ``attend`` -> ``merge`` -> ``out_proj`` so that a quantized subclass can
put quantizers between the steps (``project`` and ``attend`` are the overridable ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Sequence-first attention: query [Lq,B,E], key/value [Lk,B,E] -> [Lq,B,E].

    Same state_dict as ``torch.nn.MultiheadAttention(E, h)``: ``in_proj_weight [3E,E]``,
    ``in_proj_bias [3E]``, ``out_proj.weight [E,E]``, ``out_proj.bias [E]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = float(self.head_dim) ** -0.5
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # as torch.nn.MultiheadAttention (same order of random draws)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        """[L,B,E] -> [B,h,L,d]."""
        length, batch = x.shape[0], x.shape[1]
        return x.reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections: [L,B,E] each -> q [B,h,Lq,d], k [B,h,Lk,d], v [B,h,Lk,d]."""
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:e], b[:e])
        k = F.linear(key, w[e : 2 * e], b[e : 2 * e])
        v = F.linear(value, w[2 * e :], b[2 * e :])
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """Scaled dot-product attention: -> [B,h,Lq,d]. ``key_padding_mask`` [B,Lk], True = ignore."""
        scores = (q @ k.transpose(-2, -1)) * self.scaling  # [B,h,Lq,Lk]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        return attn @ v

    def merge(self, out: Tensor) -> Tensor:
        """[B,h,Lq,d] -> [Lq,B,E]."""
        batch, length = out.shape[0], out.shape[2]
        return out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        q, k, v = self.project(query, key, value)
        out = self.attend(q, k, v, key_padding_mask)
        return self.out_proj(self.merge(out))
