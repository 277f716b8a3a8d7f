"""Hungarian matcher, DETR set criterion, Q-DETR's FQM and DRD loss on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.train import DRDLoss, HungarianMatcher, build_criterion, drd_loss, fqm_match


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _target(labels, boxes) -> dict:
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": _t(boxes).reshape(-1, 4)}


# --- matcher ---------------------------------------------------------------------------------------------


def test_matcher_two_images_known_assignment():
    # image 0: query 0 sits on target 1, query 2 on target 0, query 1 is far away
    # image 1: only query 2 sits on the single target
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 0] = logits[0, 2, 1] = logits[1, 2, 2] = 5.0
    boxes = _t([
        [[0.70, 0.70, 0.20, 0.20], [0.05, 0.95, 0.05, 0.05], [0.21, 0.20, 0.10, 0.10]],
        [[0.10, 0.10, 0.05, 0.05], [0.90, 0.90, 0.05, 0.05], [0.50, 0.50, 0.30, 0.30]],
    ])
    targets = [_target([1, 0], [[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]),
               _target([2], [[0.5, 0.5, 0.3, 0.3]])]
    (q0, t0), (q1, t1) = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert q0.tolist() == [0, 2] and t0.tolist() == [1, 0]
    assert q1.tolist() == [2] and t1.tolist() == [0]
    assert q0.dtype == torch.int64 and t1.dtype == torch.int64


def test_matcher_image_without_targets():
    out = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.full((2, 3, 4), 0.5)}
    targets = [_target([], []), _target([1], [[0.5, 0.5, 0.2, 0.2]])]
    (q0, t0), (q1, t1) = HungarianMatcher()(out, targets)
    assert q0.numel() == 0 and t0.numel() == 0 and q1.numel() == 1


# --- criterion -------------------------------------------------------------------------------------------


def _tiny_outputs() -> dict:
    # one image, two queries, two classes (+ no-object in column 2)
    logits = _t([[[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]])
    boxes = _t([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


def test_criterion_matches_hand_computed_values():
    criterion, weights = build_criterion(num_classes=2, aux_layers=0)
    out = _tiny_outputs()
    losses = criterion(out, [_target([1], [[0.5, 0.5, 0.4, 0.4]])])
    # query 0 -> class 1 (weight 1), query 1 -> no-object (weight eos_coef = 0.1)
    nll0 = -math.log(math.exp(2) / (2 + math.exp(2)))
    nll1 = -math.log(math.e / (2 + math.e))
    assert losses["loss_ce"].item() == pytest.approx((nll0 + 0.1 * nll1) / 1.1, rel=1e-6)
    # L1: |0.2 - 0.4| * 2 over one box; GIoU: box inside target, IoU = 0.04 / 0.16, enclosing = target
    assert losses["loss_bbox"].item() == pytest.approx(0.4, rel=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.75, rel=1e-6)
    assert losses["cardinality_error"].item() == 0 and losses["class_error"].item() == 0
    total = criterion.total(losses)
    expected = losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    assert total.item() == pytest.approx(expected.item())
    assert weights == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    total.backward()
    assert out["pred_boxes"].grad is not None


def test_criterion_aux_losses_and_weights():
    criterion, weights = build_criterion(num_classes=2, aux_layers=2)
    assert set(weights) == {f"loss_{k}{s}" for k in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}
    out = _tiny_outputs()
    out["aux_outputs"] = [_tiny_outputs(), _tiny_outputs()]
    losses = criterion(out, [_target([1], [[0.5, 0.5, 0.4, 0.4]])])
    for i in range(2):
        for k in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert losses[f"{k}_{i}"].item() == pytest.approx(losses[k].item())
        assert f"class_error_{i}" not in losses
    one_layer = losses["loss_ce"].item() + 5 * 0.4 + 2 * 0.75
    assert criterion.total(losses).item() == pytest.approx(3 * one_layer)


def test_criterion_no_targets():
    criterion, _ = build_criterion(num_classes=2, aux_layers=0)
    losses = criterion(_tiny_outputs(), [_target([], [])])
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    expected = (-math.log(1 / (2 + math.exp(2))) - math.log(math.e / (2 + math.e))) / 2
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)


def test_criterion_rejects_wrong_class_count():
    criterion, _ = build_criterion(num_classes=3, aux_layers=0)
    with pytest.raises(ValueError, match="num_classes"):
        criterion(_tiny_outputs(), [_target([1], [[0.5, 0.5, 0.4, 0.4]])])


# --- FQM -------------------------------------------------------------------------------------------------

GT = _t([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2], [0.25, 0.80, 0.1, 0.1]])
STUDENT = _t([
    [0.25, 0.25, 0.20, 0.20],  # 0: equals gt0 -> GIoU 1 = G_0, kept
    [0.27, 0.25, 0.20, 0.20],  # 1: gt0 shifted by 0.02 -> GIoU 0.818 > 0.6 * 1, kept
    [0.33, 0.25, 0.20, 0.20],  # 2: gt0 shifted by 0.08 -> GIoU 0.429 < 0.6, dropped
    [0.75, 0.75, 0.16, 0.16],  # 3: inside gt1 -> GIoU 0.64 = G_1, kept
    [0.75, 0.75, 0.08, 0.08],  # 4: inside gt1 -> GIoU 0.16 < 0.6 * 0.64, dropped
    [0.90, 0.10, 0.10, 0.10],  # 5: far from everything, dropped
])  # gt2 overlaps no student box: G_2 < 0, it selects nothing
TEACHER = _t([
    [0.75, 0.75, 0.16, 0.16],  # 0: equals student 3
    [0.251, 0.25, 0.20, 0.20],  # 1: almost student 0
    [0.27, 0.25, 0.20, 0.20],  # 2: equals student 1
    [0.50, 0.50, 0.90, 0.90],  # 3: a big box nobody should pick
])


def test_fqm_keeps_foreground_queries_and_picks_teacher():
    student_idx, teacher_idx = fqm_match(GT, STUDENT, TEACHER, tau=0.6)
    assert student_idx.tolist() == [0, 1, 3]
    assert teacher_idx.tolist() == [1, 2, 0]
    assert student_idx.dtype == torch.int64 and teacher_idx.dtype == torch.int64


def test_fqm_negative_best_giou_selects_nothing():
    # gt2 alone: every student box has negative GIoU with it, so G_2 < 0 and 0.6 * G_2 > G_2: no pairs
    for tau in (0.6, 0.0):
        s, t = fqm_match(GT[2:], STUDENT, TEACHER, tau=tau)
        assert s.numel() == 0 and t.numel() == 0


def test_fqm_tau_edges():
    assert fqm_match(GT[:0], STUDENT, TEACHER)[0].numel() == 0  # no ground truth -> no pairs
    assert fqm_match(GT, STUDENT, TEACHER, tau=0.0)[0].tolist() == [0, 1, 2, 3, 4]  # GIoU > 0 with some gt
    s, t = fqm_match(GT[:0], STUDENT, TEACHER, tau=None)  # "imitate every query"
    assert s.tolist() == list(range(6)) and t.tolist()[:2] == [1, 2]


# --- DRD -------------------------------------------------------------------------------------------------


def _pairs():
    return [(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([2]))]


def test_drd_zero_when_features_coincide():
    student = torch.randn(2, 6, 8, requires_grad=True)
    teacher = torch.zeros(2, 4, 8)
    teacher[0, 1], teacher[0, 0], teacher[1, 2] = student[0, 0], student[0, 3], student[1, 2]
    loss = drd_loss(student, teacher, _pairs())
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_drd_value_and_gradient_reach_only_the_student():
    student = torch.randn(2, 6, 8, requires_grad=True)
    teacher = torch.randn(2, 4, 8, requires_grad=True)
    loss = drd_loss(student, teacher, _pairs())
    s, t = student.detach(), teacher.detach()
    expected = torch.stack([(s[0, 0] - t[0, 1]).norm(), (s[0, 3] - t[0, 0]).norm(),
                            (s[1, 2] - t[1, 2]).norm()])
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad[0, 0].abs().sum() > 0
    assert student.grad[0, 1].abs().sum() == 0  # an unpaired query gets nothing
    assert teacher.grad is None
    mse = drd_loss(student, teacher, _pairs(), distance="mse")
    assert mse.item() == pytest.approx((expected**2 / 8).mean().item(), rel=1e-5)


def test_drd_without_pairs_is_connected_zero():
    student = torch.randn(2, 6, 8, requires_grad=True)
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    loss = drd_loss(student, torch.randn(2, 4, 8), [empty, empty])
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() == 0


def test_drd_module_on_model_outputs():
    torch.manual_seed(0)
    hs_s = torch.randn(3, 1, 6, 8, requires_grad=True)  # [L,B,Q,D]
    hs_t = torch.randn(3, 1, 4, 8, requires_grad=True)
    student = {"pred_boxes": STUDENT[None], "hs": hs_s}
    teacher = {"pred_boxes": TEACHER[None], "hs": hs_t}
    targets = [{"boxes": GT, "labels": torch.zeros(3, dtype=torch.int64)}]
    last = DRDLoss()(student, teacher, targets)
    s, t = hs_s[-1, 0].detach(), hs_t[-1, 0].detach()
    pairs = [(0, 1), (1, 2), (3, 0)]
    assert last.item() == pytest.approx(torch.stack([(s[i] - t[k]).norm() for i, k in pairs]).mean().item())
    every = DRDLoss(layers="all")
    loss = every(student, teacher, targets)
    assert every.last_num_pairs == 3
    per_layer = [torch.stack([(hs_s[layer, 0, i] - hs_t[layer, 0, k]).norm() for i, k in pairs]).mean()
                 for layer in range(3)]
    assert loss.item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-6)
    loss.backward()
    assert hs_s.grad is not None and hs_t.grad is None
    with pytest.raises(QDetrError, match="layers"):
        DRDLoss(layers="first")


# --- role-consistent matching, query roles -------------------------------------------------------------


def test_query_roles_and_role_match_one_to_one():
    from qdetr_deploy.train.fqm import fqm_pairs, query_roles, role_match, role_mismatches

    # Hungarian roles: student 0 -> gt0, 3 -> gt1, 5 -> gt2; teacher 1 -> gt0, 0 -> gt1, 3 -> gt2
    s_roles = query_roles((torch.tensor([0, 3, 5]), torch.tensor([0, 1, 2])), 6)
    t_roles = query_roles((torch.tensor([0, 1, 3]), torch.tensor([1, 0, 2])), 4)
    assert s_roles.tolist() == [0, -1, -1, 1, -1, 2] and t_roles.tolist() == [1, 0, -1, 2]
    # kept by FQM (tau 0.6): 0, 1, 3. Argmax pairs (0,1), (1,2), (3,0): (1,2) joins no-object with no-object
    argmax = fqm_pairs(GT, STUDENT, TEACHER, 0.6, "argmax", s_roles, t_roles)
    assert [x.tolist() for x in argmax] == [[0, 1, 3], [1, 2, 0]]
    assert role_mismatches(argmax, s_roles, t_roles) == 0
    # role rule: query 1 has no role and is dropped; 0 -> teacher 1 (gt0), 3 -> teacher 0 (gt1)
    role = fqm_pairs(GT, STUDENT, TEACHER, 0.6, "role", s_roles, t_roles)
    assert [x.tolist() for x in role] == [[0, 3], [1, 0]]
    # every query (tau None): the role holders 0, 3, 5, each with its own teacher query
    s, t = role_match(torch.arange(6), s_roles, t_roles)
    assert s.tolist() == [0, 3, 5] and t.tolist() == [1, 0, 3] and len(set(t.tolist())) == 3
    # a pair across roles counts as a mismatch (object vs no object, and two different objects)
    crossed = (torch.tensor([0, 3]), torch.tensor([2, 1]))
    assert role_mismatches(crossed, s_roles, t_roles) == 2
    with pytest.raises(QDetrError, match="role"):
        fqm_pairs(GT, STUDENT, TEACHER, 0.6, "role")


def test_drd_term_logs_pairs_and_role_mismatch():
    from qdetr_deploy.train.distill import DistillConfig, drd_term

    torch.manual_seed(0)
    logits_s, logits_t = torch.randn(1, 6, 4), torch.randn(1, 4, 4)
    s_out = {"pred_boxes": STUDENT[None], "pred_logits": logits_s}
    t_out = {"pred_boxes": TEACHER[None], "pred_logits": logits_t}
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": GT}]
    feats_s, feats_t = torch.randn(1, 1, 6, 8, requires_grad=True), torch.randn(1, 1, 4, 8)
    for rule in ("argmax", "role"):
        loss, stats = drd_term(s_out, t_out, feats_s, feats_t, targets, DistillConfig(fqm_match=rule))
        assert set(stats) == {"drd_pairs", "drd_role_mismatch"} and loss.item() > 0
        assert 0 <= stats["drd_role_mismatch"] <= 1
        if rule == "role":
            assert stats["drd_role_mismatch"] == 0 and stats["drd_pairs"] <= 3
    _, every = drd_term(s_out, t_out, feats_s, feats_t, targets, DistillConfig(tau=None))
    assert every["drd_pairs"] == 6
