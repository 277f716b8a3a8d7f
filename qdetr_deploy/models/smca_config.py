"""``SMCAConfig``: the numbers that define a (quantizable) SMCA-DETR as released with Q-DETR, and presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DYNAMIC_SCALES = ("type3",)


@dataclass
class SMCAConfig:
    """Hyper-parameters of the SMCA-DETR that the released Q-DETR code quantizes (FIXTURE.md section 2).

    ``num_classes + 1`` classification outputs, every one an ordinary sigmoid class (no "no object" slot;
    COCO: 92 outputs indexed by category id). d_model, nheads and the 6 decoder layers are hard-coded in
    the released code (point1 input width, the 8-head prior, hs[5]); here they are fields checked to match.
    """

    backbone_layers: tuple[int, ...] = (3, 4, 6, 3)
    width_per_group: int = 64
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    num_queries: int = 300
    num_classes: int = 91
    dropout: float = 0.1
    smooth: float = 8.0
    dynamic_scale: str = "type3"
    aux_loss: bool = True
    class_names: list[str] | None = field(default=None)
    arch: str = "smca"  # tells this config from a DetrConfig in saved metadata

    def __post_init__(self) -> None:
        self.backbone_layers = tuple(int(b) for b in self.backbone_layers)
        if len(self.backbone_layers) != 4 or min(self.backbone_layers) < 1:
            raise ValueError(f"backbone_layers must be 4 positive block counts, got {self.backbone_layers}")
        if self.hidden_dim % self.nheads != 0:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        if self.dec_layers < 1 or self.enc_layers < 0:
            raise ValueError("need dec_layers >= 1 and enc_layers >= 0")
        if self.dynamic_scale not in DYNAMIC_SCALES:
            raise ValueError(f"dynamic_scale {self.dynamic_scale!r} is not one of {list(DYNAMIC_SCALES)}")
        if self.arch != "smca":
            raise ValueError(f"SMCAConfig.arch must be 'smca', got {self.arch!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone_layers"] = list(self.backbone_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SMCAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SMCAConfig keys: {', '.join(unknown)}")
        return cls(**d)


SMCA_PRESETS: dict[str, SMCAConfig] = {
    # the published Q-DETR checkpoints (4-bit 38.5 AP, 2-bit 32.4 AP)
    "smca_r50": SMCAConfig(),
    # the shrunk released-format fixture (../shared/data/qdetr_released_fixture)
    "smca_small": SMCAConfig(backbone_layers=(2, 1, 1, 1), width_per_group=8, enc_layers=2,
                             dim_feedforward=128, num_queries=20),
}
