"""Lowering rules: one per module kind (``registry.py``), grouped by concept: plain layers (``layers.py``),
the backbone (``backbone.py``), attention (``attention.py``), the transformer (``transformer.py``), the
detector and its heads (``heads.py``). Importing the package registers every rule."""

from qdetr_deploy.export.lower import attention, backbone, heads, layers, transformer  # noqa: F401 (rules)
from qdetr_deploy.export.lower.registry import (
    RULES,
    LowerCtx,
    check_rules,
    lower,
    lowers,
    missing_rules,
)

__all__ = ["RULES", "LowerCtx", "check_rules", "lower", "lowers", "missing_rules"]
