"""Training: Hungarian matcher, DETR's set criterion, Q-DETR's FQM and DRD distillation loss.

(The training loop and distributed set-up live in their own modules of this package.)
"""

from qdetr_deploy.train.criterion import SetCriterion, build_criterion
from qdetr_deploy.train.fqm import PAPER_LAMBDA, PAPER_TAU, DRDLoss, drd_loss, foreground_queries, fqm_match
from qdetr_deploy.train.matcher import HungarianMatcher

__all__ = [
    "PAPER_LAMBDA",
    "PAPER_TAU",
    "DRDLoss",
    "HungarianMatcher",
    "SetCriterion",
    "build_criterion",
    "drd_loss",
    "foreground_queries",
    "fqm_match",
]
