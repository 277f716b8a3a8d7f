"""Q-DETR's foreground-aware query matching (FQM) and distillation loss (DRD), reference sheet §3.

For one image with ground truth ``gt_i`` and student boxes ``b_j``:

1. ``G_i = max_j GIoU(gt_i, b_j)``;
2. student query ``j`` is kept when ``GIoU(gt_i, b_j) > tau * G_i`` for at least one ``i``;
3. each kept ``j`` takes the teacher query ``k = argmax_k 2 GIoU(b_j, b_k^T) - 5 |b_j - b_k^T|_1``
   (an independent argmax, not a one-to-one assignment; L1 on normalised cx,cy,w,h, GIoU on xyxy);
4. ``L_DRD = mean over kept pairs of ||D_j^S - D_k^T||_2``; the total loss is ``L_GT + lambda L_DRD``.

Reading of the rule, followed literally:
- GIoU lies in [-1, 1], so ``G_i`` can be <= 0 (no student box overlaps ``gt_i``). Then ``tau * G_i >= G_i``
  for ``0 <= tau < 1`` and no query can pass, so such a ground truth selects nothing: only ground truths that
  some student box already overlaps (``G_i > 0``) select foreground queries. This is the literal rule; it also
  means early in training, with poor student boxes, few or no pairs exist and the DRD loss is 0.
- ``tau = 0`` keeps the queries with GIoU > 0 with some ground truth, not literally every query. The paper's
  "tau = 0 imitates every query" ablation is ``tau=None`` here: every student query is kept, with or
  without ground truth.
- No ground truth (and ``tau`` not None) -> no pairs. Ties in the teacher argmax pick the lowest index.
- Degenerate (zero-area) boxes give GIoU NaN; it is read as -1 (worst match).

Step 3 has a second rule, ``rule="role"`` (not the paper's): a query's *role* is the ground truth the
Hungarian matcher (the one of ``L_GT``) assigns it to, or none. A kept student query with a role is paired
with the teacher query that has the same role (one to one: each ground truth has one query on each side);
kept queries without a role are dropped. The argmax rule can pair a query that detects an object with a
teacher query that predicts "no object", or two student queries with one teacher query; the role-mismatch
rate (:func:`role_mismatches`) measures how often.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from qdetr_deploy.train.config import (  # noqa: F401  (PAPER_LAMBDA, MATCH_RULES: re-exported)
    MATCH_RULES,
    PAPER_LAMBDA,
    PAPER_TAU,
)

DISTANCES = ("l2", "mse")
NO_ROLE = -1
Pairs = list[tuple[Tensor, Tensor]]


def _giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of cx,cy,w,h boxes ``a [N,4]`` and ``b [M,4]`` -> ``[N,M]``, NaN read as -1."""
    return torch.nan_to_num(generalized_box_iou(box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b)), nan=-1.0)


def foreground_queries(gt_boxes: Tensor, student_boxes: Tensor, tau: float | None = PAPER_TAU) -> Tensor:
    """Indices (sorted) of the student queries kept by FQM steps 1-2."""
    n = student_boxes.shape[0]
    if tau is None:
        return torch.arange(n, device=student_boxes.device)
    if gt_boxes.shape[0] == 0 or n == 0:
        return torch.zeros(0, dtype=torch.int64, device=student_boxes.device)
    giou = _giou(gt_boxes.to(student_boxes), student_boxes)  # [G, N]
    best = giou.max(dim=1, keepdim=True).values  # G_i
    return (giou > tau * best).any(dim=0).nonzero().flatten()


@torch.no_grad()
def fqm_match(gt_boxes: Tensor, student_boxes: Tensor, teacher_boxes: Tensor,
              tau: float | None = PAPER_TAU) -> tuple[Tensor, Tensor]:
    """FQM for one image: ``(student_idx [P], teacher_idx [P])`` int64, student indices ascending.

    ``gt_boxes [G,4]``, ``student_boxes [N,4]``, ``teacher_boxes [M,4]``: normalised cx,cy,w,h.
    """
    s, t = student_boxes.detach().float(), teacher_boxes.detach().float().to(student_boxes.device)
    kept = foreground_queries(gt_boxes.detach().float(), s, tau)
    if kept.numel() == 0 or t.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=s.device)
        return empty, empty.clone()
    sk = s[kept]
    score = 2 * _giou(sk, t) - 5 * torch.cdist(sk, t, p=1)
    return kept, score.argmax(dim=1)


def query_roles(indices: tuple[Tensor, Tensor], num_queries: int) -> Tensor:
    """``[N]`` int64: the ground truth each query is assigned to by a Hungarian ``(query_idx, target_idx)``
    assignment, :data:`NO_ROLE` (-1) for the others."""
    query_idx, target_idx = indices
    roles = torch.full((num_queries,), NO_ROLE, dtype=torch.int64)
    roles[query_idx.cpu()] = target_idx.cpu()
    return roles


@torch.no_grad()
def role_match(kept: Tensor, student_roles: Tensor, teacher_roles: Tensor) -> tuple[Tensor, Tensor]:
    """The ``rule="role"`` step 3: kept student queries that have a role, each with the teacher query of the
    same role -> ``(student_idx [P], teacher_idx [P])``, one to one, student indices ascending."""
    teacher_of = {r: k for k, r in enumerate(teacher_roles.tolist()) if r != NO_ROLE}
    roles = student_roles.tolist()
    pairs = [(j, teacher_of[roles[j]]) for j in kept.tolist() if roles[j] in teacher_of]
    s_idx = torch.tensor([j for j, _ in pairs], dtype=torch.int64, device=kept.device)
    t_idx = torch.tensor([k for _, k in pairs], dtype=torch.int64, device=kept.device)
    return s_idx, t_idx


def role_mismatches(pairs: tuple[Tensor, Tensor], student_roles: Tensor, teacher_roles: Tensor) -> int:
    """How many pairs join queries with different roles (another object, or an object and none)."""
    s_idx, t_idx = pairs
    return int((student_roles[s_idx.cpu()] != teacher_roles[t_idx.cpu()]).sum())


@torch.no_grad()
def fqm_pairs(gt_boxes: Tensor, student_boxes: Tensor, teacher_boxes: Tensor, tau: float | None,
              rule: str, student_roles: Tensor | None = None,
              teacher_roles: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FQM pairs of one image under ``rule`` (``"argmax"``: :func:`fqm_match`; ``"role"``: foreground
    queries of steps 1-2 paired by :func:`role_match`, which needs both role vectors)."""
    if rule == "argmax":
        return fqm_match(gt_boxes, student_boxes, teacher_boxes, tau)
    if rule != "role" or student_roles is None or teacher_roles is None:
        raise QDetrError(f"FQM rule must be one of {MATCH_RULES} (role needs query roles), got {rule!r}")
    kept = foreground_queries(gt_boxes.detach().float(), student_boxes.detach().float(), tau)
    return role_match(kept, student_roles, teacher_roles)


def _layers(feats: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(feats, Tensor):
        return list(feats) if feats.dim() == 4 else [feats]
    return list(feats)


def _layer_distance(s: Tensor, t: Tensor, pairs: Pairs, distance: str, reduction: str) -> Tensor:
    if s.shape[-1] != t.shape[-1] or s.shape[0] != t.shape[0] or s.shape[0] != len(pairs):
        raise ValueError(f"DRD: student {tuple(s.shape)} and teacher {tuple(t.shape)} features and "
                         f"{len(pairs)} pair lists do not line up (same B and D needed)")
    si = [s[b, i] for b, (i, _) in enumerate(pairs)]
    ti = [t[b, k.to(t.device)] for b, (_, k) in enumerate(pairs)]
    ds, dt = torch.cat(si), torch.cat(ti).detach().to(s)
    if ds.shape[0] == 0:
        return s.sum() * 0.0  # zero, still connected to the student graph
    diff = ds - dt
    per_pair = torch.linalg.vector_norm(diff, dim=-1) if distance == "l2" else diff.pow(2).mean(-1)
    return per_pair.mean() if reduction == "mean" else per_pair.sum()


def drd_loss(student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor],
             pairs: Pairs, distance: str = "l2", reduction: str = "mean") -> Tensor:
    """Distillation loss over FQM pairs; the teacher is detached, so only the student gets a gradient.

    Features are ``[B,N,D]`` (one layer), a list of them, or ``hs``-shaped ``[L,B,N,D]`` (one per layer; the
    student's and teacher's layer counts must match). ``pairs[b] = (student_idx, teacher_idx)`` for image b.
    ``distance="l2"``: ``||D_s - D_t||_2`` per pair (the paper); ``"mse"``: mean squared difference per
    channel. ``reduction``: ``"mean"`` over all pairs of the batch (pooled, not per image) or ``"sum"``.
    Several layers are averaged. No pairs: exactly 0 with a ``grad_fn`` on the student features.
    """
    if distance not in DISTANCES:
        raise QDetrError(f"DRD distance must be one of {DISTANCES}, got {distance!r}")
    if reduction not in ("mean", "sum"):
        raise QDetrError(f"DRD reduction must be 'mean' or 'sum', got {reduction!r}")
    s_layers, t_layers = _layers(student_feats), _layers(teacher_feats)
    if len(s_layers) != len(t_layers) or not s_layers:
        raise ValueError(f"DRD: {len(s_layers)} student layers vs {len(t_layers)} teacher layers")
    losses = [_layer_distance(s, t, pairs, distance, reduction) for s, t in zip(s_layers, t_layers)]
    return torch.stack(losses).mean()


class DRDLoss(nn.Module):
    """FQM + DRD on model outputs: ``loss = drd(student_out, teacher_out, targets)``.

    Choices the paper leaves open, as options (defaults first):
    - ``feature="hs"``: D is the decoder output after the final decoder norm, i.e. after the cross-attention
      block's output projection, residual and FFN, exactly what the class/box heads read (``hs`` in the
      model output). It is the only feature offered; capturing others is the training loop's business.
    - ``layers="last"``: distil the last decoder layer; ``"all"`` averages the loss over every layer of
      ``hs`` (student and teacher need the same number of decoder layers). The FQM pairs always come from
      the final predictions (``pred_boxes``) and are reused for every layer.
    - ``distance="l2"`` (paper: L2 norm per pair) or ``"mse"``; ``reduction="mean"`` pools all kept pairs
      of the batch (images with more foreground queries weigh more), ``"sum"`` sums them.
    - ``tau=0.6`` (paper); ``None`` keeps every query (the paper's "tau = 0" ablation).
    The paper's weight ``lambda = 2.5`` (:data:`PAPER_LAMBDA`) is applied by the caller.
    ``last_num_pairs`` holds the number of pairs of the latest call, for logging.
    """

    def __init__(self, tau: float | None = PAPER_TAU, layers: str = "last", feature: str = "hs",
                 distance: str = "l2", reduction: str = "mean") -> None:
        super().__init__()
        if layers not in ("last", "all"):
            raise QDetrError(f"DRD layers must be 'last' or 'all', got {layers!r}")
        if feature != "hs":
            raise QDetrError(f"DRD feature must be 'hs' (decoder output read by the heads), got {feature!r}")
        if distance not in DISTANCES:
            raise QDetrError(f"DRD distance must be one of {DISTANCES}, got {distance!r}")
        if tau is not None and not 0 <= tau < 1:
            raise QDetrError(f"DRD tau must be in [0, 1) or None, got {tau}")
        self.tau, self.layers, self.feature = tau, layers, feature
        self.distance, self.reduction = distance, reduction
        self.last_num_pairs = 0

    def match(self, student_out: dict, teacher_out: dict, targets: list[dict[str, Tensor]]) -> Pairs:
        """FQM pairs per image from the final predicted boxes."""
        s_boxes, t_boxes = student_out["pred_boxes"], teacher_out["pred_boxes"]
        return [fqm_match(t["boxes"], s_boxes[b], t_boxes[b], self.tau) for b, t in enumerate(targets)]

    def forward(self, student_out: dict, teacher_out: dict, targets: list[dict[str, Tensor]]) -> Tensor:
        pairs = self.match(student_out, teacher_out, targets)
        self.last_num_pairs = sum(int(i.numel()) for i, _ in pairs)
        s, t = student_out[self.feature], teacher_out[self.feature]
        if self.layers == "last":
            s, t = s[-1], t[-1]
        return drd_loss(s, t, pairs, self.distance, self.reduction)
