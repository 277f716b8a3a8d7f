"""DETR as facebookresearch/detr names it (config, presets, backbone, transformer, heads, post-processing),
and the released Q-DETR SMCA-DETR (``smca_*``)."""

from .attention import MultiheadAttention
from .config import PRESETS, DetrConfig, get_preset
from .detr import DETR, MLP, build_detr
from .postprocess import PostProcess, postprocess, sigmoid_topk
from .smca_config import SMCA_PRESETS, SMCAConfig
from .smca_detr import SMCADETR, build_smca_detr


def build_model(cfg: DetrConfig | SMCAConfig) -> DETR | SMCADETR:
    """An untrained DETR or SMCA-DETR, whichever ``cfg`` describes."""
    return build_smca_detr(cfg) if isinstance(cfg, SMCAConfig) else build_detr(cfg)


__all__ = [
    "DETR",
    "MLP",
    "PRESETS",
    "SMCADETR",
    "SMCA_PRESETS",
    "SMCAConfig",
    "DetrConfig",
    "MultiheadAttention",
    "PostProcess",
    "build_detr",
    "build_model",
    "build_smca_detr",
    "get_preset",
    "postprocess",
    "sigmoid_topk",
]
