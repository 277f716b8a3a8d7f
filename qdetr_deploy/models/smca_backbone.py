"""The released Q-DETR ResNet (keys ``backbone.0.body.*``): bottlenecks with LearnableBias/PReLU, no ReLU.

FIXTURE.md section 4.3. Every conv input sits behind a LearnableBias - PReLU - LearnableBias sandwich (the
quantizer placement puts the conv's input quantizer after it); block input, output, identity and the
full-precision downsample path are never quantized. Batch norms are frozen (eps 1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from .backbone import BackboneBase, FrozenBatchNorm2d, Joiner
from .position_encoding import PositionEmbeddingSine


class LearnableBias(nn.Module):
    """x + bias, one bias per channel (``bias`` [1,C,1,1], the released name and shape)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # [B,C,H,W]
        return x + self.bias


def _sandwich(channels: int) -> tuple[LearnableBias, nn.PReLU, LearnableBias]:
    return LearnableBias(channels), nn.PReLU(channels), LearnableBias(channels)


class SMCABottleneck(nn.Module):
    """Bottleneck C_in -> width -> width (3x3, stride) -> 4*planes, with the released LB-PReLU-LB sandwiches.

    u = bn1(conv1(LB12(PReLU1(LB11(x))))); u = bn2(conv2(LB22(PReLU2(LB21(u)))));
    u = bn3(conv3(LB32(PReLU3(LB31(u))))); y = LB02(PReLU0(LB01(u + identity))).
    The convs carry a (full-precision) bias as released.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, width: int, stride: int,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        out = planes * self.expansion
        self.bias11, self.prelu1, self.bias12 = _sandwich(inplanes)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=True)
        self.bn1 = FrozenBatchNorm2d(width)
        self.bias21, self.prelu2, self.bias22 = _sandwich(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=True)
        self.bn2 = FrozenBatchNorm2d(width)
        self.bias31, self.prelu3, self.bias32 = _sandwich(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=True)
        self.bn3 = FrozenBatchNorm2d(out)
        self.downsample = downsample
        self.bias01, self.prelu0, self.bias02 = _sandwich(out)

    def forward(self, x: Tensor) -> Tensor:  # [B,C_in,H,W] -> [B,4p,H/s,W/s]
        u = self.bn1(self.conv1(self.bias12(self.prelu1(self.bias11(x)))))
        u = self.bn2(self.conv2(self.bias22(self.prelu2(self.bias21(u)))))
        u = self.bn3(self.conv3(self.bias32(self.prelu3(self.bias31(u)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.bias02(self.prelu0(self.bias01(u + identity)))


class SMCAResNet(nn.Module):
    """Stem (7x7/2 conv without bias, FrozenBN, PReLU, 3x3/2 max pool) and four bottleneck stages."""

    def __init__(self, layers: tuple[int, ...], width_per_group: int = 64) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            width = planes * width_per_group // 64
            setattr(self, f"layer{i + 1}", self._make_layer(planes, width, blocks, 1 if i == 0 else 2))

    def _make_layer(self, planes: int, width: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * SMCABottleneck.expansion
        # every stage's first block has a full-precision downsample (layer1.0 too: 64 -> 256 channels)
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                   FrozenBatchNorm2d(out))
        layers = [SMCABottleneck(self.inplanes, planes, width, stride, downsample)]
        self.inplanes = out
        layers += [SMCABottleneck(out, planes, width, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # [B,3,H,W] -> [B,2048,H/32,W/32]
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SMCABackbone(BackboneBase):
    """The released ResNet as a DETR backbone: ``body`` returns ``{"0": layer4}``, stride 32."""

    def __init__(self, layers: tuple[int, ...], width_per_group: int) -> None:
        body = IntermediateLayerGetter(SMCAResNet(layers, width_per_group), return_layers={"layer4": "0"})
        super().__init__(body, num_channels=2048, stride=32)


def build_smca_backbone(layers: tuple[int, ...], width_per_group: int, hidden_dim: int) -> Joiner:
    """Backbone + sine position embedding (normalised, ``hidden_dim // 2`` features per axis)."""
    position = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    return Joiner(SMCABackbone(layers, width_per_group), position)
