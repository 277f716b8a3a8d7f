"""Lowering rules: one per module kind (``registry.py``), grouped by concept: plain layers (``layers.py``),
the backbone (``backbone.py``), attention (``attention.py``), the transformer (``transformer.py``), the
detector and its heads (``heads.py``), and the released Q-DETR SMCA-DETR (``smca_backbone.py``,
``smca.py``). Importing the package registers every rule."""

from qdetr_deploy.export.lower import (  # noqa: F401 (registers the rules)
    attention,
    backbone,
    heads,
    layers,
    smca,
    smca_backbone,
    transformer,
)
from qdetr_deploy.export.lower.registry import (
    RULES,
    LowerCtx,
    check_rules,
    lower,
    lowers,
    missing_rules,
)

__all__ = ["RULES", "LowerCtx", "check_rules", "lower", "lowers", "missing_rules"]
