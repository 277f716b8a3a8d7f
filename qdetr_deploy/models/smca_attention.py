"""Attention of the released SMCA-DETR: ``in_proj`` / ``out_proj`` are Linear modules and every step a module.

Float model: ``norm_q``, ``q_act``, ``k_act``, ``v_act`` and ``attn_act`` are identities, slots where the
quantizer placement (``qdetr_deploy.quant.smca``) puts distribution alignment and the 8-bit per-head
quantizers; ``in_proj`` / ``out_proj`` may become weight-quantized linears. Order (FIXTURE.md 4.5, 4.8):
q, k, v = slices of in_proj; q = q_act(norm_q(q)); k = k_act(k); logits = (q k^T) * d^-0.5;
padded keys -> -inf; + attn_bias (SMCA Gaussian log-prior); p = attn_act(softmax(logits)); o = p v_act(v).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def linear_weight(layer: nn.Linear) -> Tensor:
    """The weight a linear layer computes with: a weight-quantized layer's fake-quantized weight."""
    quant_weight = getattr(layer, "quant_weight", None)
    return quant_weight() if quant_weight is not None else layer.weight


class SMCAMultiheadAttention(nn.Module):
    """Sequence-first attention: query [Lq,B,E], key/value [Lk,B,E] -> [Lq,B,E] (released key names:
    ``in_proj.weight`` [3E,E], ``in_proj.bias`` [3E], ``out_proj.weight`` [E,E], ``out_proj.bias`` [E])."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = float(self.head_dim) ** -0.5
        self.dropout = dropout
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.norm_q: nn.Module = nn.Identity()
        self.q_act: nn.Module = nn.Identity()
        self.k_act: nn.Module = nn.Identity()
        self.v_act: nn.Module = nn.Identity()
        self.attn_act: nn.Module = nn.Identity()

    def _split_heads(self, x: Tensor) -> Tensor:
        """[L,B,E] -> [B,h,L,d] (channel = head * d + j)."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,h,Lq,d], k and v [B,h,Lk,d] from the rows 0:E, E:2E, 2E:3E of ``in_proj``."""
        w, b, e = linear_weight(self.in_proj), self.in_proj.bias, self.embed_dim
        q = F.linear(query, w[:e], b[:e])
        k = F.linear(key, w[e : 2 * e], b[e : 2 * e])
        v = F.linear(value, w[2 * e :], b[2 * e :])
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
               attn_bias: Tensor | None) -> Tensor:
        """-> [B,h,Lq,d]. key_padding_mask [B,Lk] (True = ignore); attn_bias [B,h,Lq,Lk] added after it."""
        q, k = self.q_act(self.norm_q(q)), self.k_act(k)
        logits = (q @ k.transpose(-2, -1)) * self.scaling  # [B,h,Lq,Lk]
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if attn_bias is not None:
            logits = logits + attn_bias
        attn = self.attn_act(logits.softmax(dim=-1))
        attn = F.dropout(attn, p=self.dropout, training=self.training)
        return attn @ self.v_act(v)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                attn_bias: Tensor | None = None) -> Tensor:
        q, k, v = self.project(query, key, value)
        out = self.attend(q, k, v, key_padding_mask, attn_bias)  # [B,h,Lq,d]
        out = out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], self.embed_dim)  # [Lq,B,E]
        return self.out_proj(out)
