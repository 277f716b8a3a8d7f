"""DETR as facebookresearch/detr names it: config, presets, backbone, transformer, heads, post-processing."""

from .attention import MultiheadAttention
from .config import PRESETS, DetrConfig, get_preset
from .detr import DETR, MLP, build_detr
from .postprocess import PostProcess, postprocess

__all__ = [
    "DETR",
    "MLP",
    "PRESETS",
    "DetrConfig",
    "MultiheadAttention",
    "PostProcess",
    "build_detr",
    "get_preset",
    "postprocess",
]
