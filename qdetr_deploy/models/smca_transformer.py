"""The SMCA transformer of the released Q-DETR code (FIXTURE.md 4.4-4.8): post-norm encoder, SMCA decoder.

Sequence-first tensors [L,B,D]. Decoder layer l: ``norm4(tgt + query_pos)`` feeds ``point2`` (per-head
offsets), ``point3`` (per-head sqrt scales) and, in layer 0 only, ``point1`` (the reference logits r); the
cross-attention adds a Gaussian log-prior around each head's centre. A shared ``decoder.norm`` is applied to
every layer's output (hs), while the next layer gets the un-normed tgt. No final encoder norm.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detr import MLP
from .smca_attention import SMCAMultiheadAttention

REF_STRIDE = 32  # the released code scales the reference by the unpadded size / 32 (hard-coded)


class SMCAEncoderLayer(nn.Module):
    """src = norm1(src + self_attn(src + pos, src + pos, src));
    src = norm2(src + linear2(relu(linear1(src))))."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SMCAMultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor) -> Tensor:  # [HW,B,D]
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask)))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class GaussianPrior(nn.Module):
    """SMCA's log-prior G[b,h,i,t] = -| sx_h (Px_h - gx_t)^2 + sy_h (Py_h - gy_t)^2 | / smooth ("type3":
    separate x and y scales per head, (sx, sy) = point3(o)^2; P_h = reference + point2 offset of head h)."""

    def __init__(self, nheads: int, smooth: float) -> None:
        super().__init__()
        self.nheads, self.smooth = nheads, smooth

    def forward(self, ref: Tensor, offset: Tensor, scale_sqrt: Tensor, grid: Tensor) -> Tensor:
        """ref [Nq,B,2] (x,y in cells), offset and scale_sqrt [Nq,B,2h], grid [HW,2] -> [B,h,Nq,HW]."""
        nq, bs = ref.shape[:2]
        centre = ref[:, :, None, :] + offset.reshape(nq, bs, self.nheads, 2)  # [Nq,B,h,2]
        scale = (scale_sqrt * scale_sqrt).reshape(nq, bs, self.nheads, 1, 2)
        diff = centre[:, :, :, None, :] - grid  # [Nq,B,h,HW,2]
        dist = scale * (diff * diff)
        g = -(dist[..., 0] + dist[..., 1]).abs() / self.smooth  # [Nq,B,h,HW]
        return g.permute(1, 2, 0, 3)


class SMCADecoderLayer(nn.Module):
    """Post-norm decoder layer with SMCA cross-attention (layer 0 also owns ``point1``, the reference MLP)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, smooth: float,
                 first: bool) -> None:
        super().__init__()
        self.self_attn = SMCAMultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = SMCAMultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.point1 = MLP(d_model, d_model, 2, 3) if first else None
        self.point2 = nn.Linear(d_model, 2 * nhead)
        self.point3 = nn.Linear(d_model, 2 * nhead)
        self.prior = GaussianPrior(nhead, smooth)

    def reference(self, o: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Layer 0: r = point1(o) [Nq,B,2] logits and ref = sigmoid(r) * (W, H) / 32 [Nq,B,2] in cells."""
        r = self.point1(o)
        wh = sizes.flip(-1).to(r.dtype) / REF_STRIDE  # [B,2] = (W, H) / 32
        return r, r.sigmoid() * wh

    def forward(self, tgt: Tensor, memory: Tensor, key_padding_mask: Tensor | None, pos: Tensor,
                query_pos: Tensor, grid: Tensor, ref: Tensor | None, sizes: Tensor
                ) -> tuple[Tensor, Tensor | None, Tensor]:
        """tgt [Nq,B,D], memory/pos [HW,B,D] -> (tgt, r (layer 0, else None), ref [Nq,B,2])."""
        o = self.norm4(tgt + query_pos)
        offset = self.point2(o)  # [Nq,B,2h]
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt)))
        r = None
        if ref is None:
            r, ref = self.reference(o, sizes)
        bias = self.prior(ref, offset, self.point3(o), grid)  # [B,h,Nq,HW]
        tgt2 = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask, bias)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2)), r, ref


class SMCADecoder(nn.Module):
    def __init__(self, layer: SMCADecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        first = copy.deepcopy(layer)
        rest = copy.deepcopy(layer)
        rest.point1 = None
        self.layers = nn.ModuleList([first] + [copy.deepcopy(rest) for _ in range(num_layers - 1)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, key_padding_mask: Tensor | None, pos: Tensor,
                query_pos: Tensor, grid: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """-> hs [L,Nq,B,D] (each layer's output through the shared norm), r [Nq,B,2] (layer 0's logits)."""
        hs, ref, r0 = [], None, None
        for layer in self.layers:
            tgt, r, ref = layer(tgt, memory, key_padding_mask, pos, query_pos, grid, ref, sizes)
            r0 = r if r is not None else r0
            hs.append(self.norm(tgt))
        return torch.stack(hs), r0


def token_grid(h: int, w: int, like: Tensor) -> Tensor:
    """[h*w, 2] (gx, gy) cell coordinates of the tokens t = y*w + x of an h x w feature map."""
    gy, gx = torch.meshgrid(torch.arange(h, device=like.device), torch.arange(w, device=like.device),
                            indexing="ij")
    return torch.stack((gx.flatten(), gy.flatten()), 1).to(like.dtype)


class SMCATransformer(nn.Module):
    """forward(src [B,D,h,w], mask [B,h,w], query_embed [Nq,2D] (query_pos | initial tgt), pos [B,D,h,w],
    sizes [B,2] unpadded (h, w) of the input images) -> hs [L,B,Nq,D], reference logits r [B,Nq,2]."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 smooth: float = 8.0) -> None:
        super().__init__()
        enc = SMCAEncoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(num_encoder_layers))
        dec = SMCADecoderLayer(d_model, nhead, dim_feedforward, dropout, smooth, first=True)
        self.decoder = SMCADecoder(dec, num_decoder_layers, d_model)
        self.d_model, self.nhead = d_model, nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor, sizes: Tensor
                ) -> tuple[Tensor, Tensor]:
        bs, _, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # [HW,B,D]
        pos = pos.flatten(2).permute(2, 0, 1)
        key_padding_mask = mask.flatten(1)  # [B,HW]
        query_pos, tgt = query_embed.unsqueeze(1).repeat(1, bs, 1).split(self.d_model, dim=-1)  # [Nq,B,D]
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, key_padding_mask, pos)
        hs, r = self.decoder(tgt, memory, key_padding_mask, pos, query_pos, token_grid(h, w, src), sizes)
        return hs.transpose(1, 2), r.transpose(0, 1)
