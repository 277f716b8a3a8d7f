"""Training: Hungarian matcher, DETR's set criterion, Q-DETR's FQM and DRD distillation loss.

(The training loop and distributed set-up live in their own modules of this package.)
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it; imported on first use (PEP 562), so that importing a
# torch-free submodule such as ``config`` does not import torch (the CLI's --help runs without it)
_EXPORTS = {
    "DRDLoss": "fqm",
    "HungarianMatcher": "matcher",
    "PAPER_LAMBDA": "config",
    "PAPER_TAU": "config",
    "SetCriterion": "criterion",
    "build_criterion": "criterion",
    "drd_loss": "fqm",
    "foreground_queries": "fqm",
    "fqm_match": "fqm",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
