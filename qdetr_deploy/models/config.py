"""``DetrConfig``: the few numbers that define a DETR, and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .smca_config import SMCA_PRESETS, SMCAConfig

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "tiny")


@dataclass
class DetrConfig:
    """Hyper-parameters of a DETR; field names follow facebookresearch/detr's command-line arguments.

    ``num_classes`` follows upstream: ``class_embed`` has ``num_classes + 1`` outputs, the last one is
    "no object" (COCO: 91, so 92 outputs).
    """

    backbone: str = "resnet50"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    num_queries: int = 100
    num_classes: int = 91
    dropout: float = 0.1
    aux_loss: bool = True
    dilation: bool = False
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}")
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        if self.hidden_dim % 2 != 0:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even (sine position embedding)")
        if self.dec_layers < 1 or self.enc_layers < 0:
            raise ValueError("need dec_layers >= 1 and enc_layers >= 0")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict(to_dict())`` round-trips)."""
        d = dataclasses.asdict(self)
        if d["class_names"] is not None:
            d["class_names"] = list(d["class_names"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetrConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DetrConfig keys: {', '.join(unknown)}")
        d = dict(d)
        if d.get("class_names") is not None:
            d["class_names"] = list(d["class_names"])
        return cls(**d)


PRESETS: dict[str, DetrConfig] = {
    "detr_r50": DetrConfig(backbone="resnet50"),
    "detr_r101": DetrConfig(backbone="resnet101"),
    "detr_r18": DetrConfig(backbone="resnet18"),
    # a demo-sized model: head_dim 32, stride-16 conv backbone, 3 classes (procedural shapes)
    "detr_tiny": DetrConfig(
        backbone="tiny",
        hidden_dim=96,
        nheads=3,
        enc_layers=2,
        dec_layers=2,
        dim_feedforward=384,
        num_queries=10,
        num_classes=3,
        dropout=0.0,
    ),
}


def get_preset(name: str, **overrides: Any) -> DetrConfig | SMCAConfig:
    """A fresh copy of preset ``name`` (DETR or SMCA-DETR), with optional field overrides; unknown name ->
    ``KeyError``."""
    if name in SMCA_PRESETS:
        return SMCAConfig.from_dict({**SMCA_PRESETS[name].to_dict(), **overrides})
    if name not in PRESETS:
        known = ", ".join(sorted([*PRESETS, *SMCA_PRESETS]))
        raise KeyError(f"unknown DETR preset {name!r}; known: {known}")
    return DetrConfig.from_dict({**PRESETS[name].to_dict(), **overrides})
