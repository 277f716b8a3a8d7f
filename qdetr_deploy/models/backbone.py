"""Backbones, as in facebookresearch/detr ``models/backbone.py`` (state_dict keys ``backbone.0.body.*``)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from .position_encoding import PositionEmbeddingSine, build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters), as upstream."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        # reshapes up front to be fuser-friendly, as upstream
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        eps = 1e-5
        scale = w * (rv + eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BackboneBase(nn.Module):
    """``body`` returns ``{"0": features}``; forward(images [B,3,H,W], mask [B,H,W] | None)
    -> features [B,C,h,w], mask [B,h,w] bool (None -> all False)."""

    def __init__(self, body: nn.Module, num_channels: int, stride: int) -> None:
        super().__init__()
        self.body = body
        self.num_channels = num_channels
        self.stride = stride

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.body(images)["0"]  # [B,C,h,w]
        if mask is None:
            feat_mask = torch.zeros_like(x[:, 0], dtype=torch.bool)  # no padding
        else:
            feat_mask = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return x, feat_mask


class Backbone(BackboneBase):
    """torchvision ResNet with frozen BatchNorm; only layer2-4 train when ``train_backbone``."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False) -> None:
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(RESNETS)}")
        resnet = getattr(torchvision.models, name)(
            weights=None,  # never download: weights come from a checkpoint
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d,
        )
        for pname, parameter in resnet.named_parameters():
            if not train_backbone or (
                "layer2" not in pname and "layer3" not in pname and "layer4" not in pname
            ):
                parameter.requires_grad_(False)
        body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        super().__init__(body, num_channels, stride=16 if dilation else 32)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(BackboneBase):
    """A demo backbone: four stride-2 3x3 conv blocks (32, 64, 96, 128 channels), stride 16.

    Named like a ResNet: the stem is ``body.conv1``/``body.bn1``, then ``body.layer1..3``.
    Trains fully when ``train_backbone`` (it has no pretrained weights), else is frozen.
    """

    channels = (32, 64, 96, 128)

    def __init__(self, train_backbone: bool = True) -> None:
        c = self.channels
        net = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, c[0], kernel_size=3, stride=2, padding=1, bias=False),
                bn1=nn.BatchNorm2d(c[0]),
                relu=nn.ReLU(inplace=True),
                layer1=_conv_block(c[0], c[1]),
                layer2=_conv_block(c[1], c[2]),
                layer3=_conv_block(c[2], c[3]),
            )
        )
        if not train_backbone:
            net.requires_grad_(False)
        body = IntermediateLayerGetter(net, return_layers={"layer3": "0"})
        super().__init__(body, num_channels=c[-1], stride=16)


class Joiner(nn.Sequential):
    """``Sequential(backbone, position_embedding)`` as upstream, so keys are ``backbone.0.body.*``.

    forward(images [B,3,H,W], mask [B,H,W] | None) -> features [B,C,h,w], mask [B,h,w], pos [B,D,h,w]
    (last level only).
    """

    def __init__(self, backbone: BackboneBase, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        features, feat_mask = self[0](images, mask)
        pos = self[1](feat_mask).to(features.dtype)
        return features, feat_mask, pos


def build_backbone(name: str, hidden_dim: int, train_backbone: bool = True, dilation: bool = False) -> Joiner:
    """Backbone + sine position embedding (``hidden_dim // 2`` features per axis)."""
    if name == "tiny":
        if dilation:
            raise ValueError("dilation is only for ResNet backbones, not 'tiny'")
        backbone: BackboneBase = TinyBackbone(train_backbone)
    else:
        backbone = Backbone(name, train_backbone, dilation)
    return Joiner(backbone, build_position_encoding(hidden_dim))


def batchnorm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 ``(scale, shift)`` with ``norm(y) = y * scale + shift`` for an eval-mode
    ``BatchNorm2d`` or ``FrozenBatchNorm2d``: the one folding rule export and the GPU engine both use."""
    if not isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        raise TypeError(f"cannot fold {type(norm).__name__}")
    eps = getattr(norm, "eps", 1e-5)
    w = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    b = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_var)
    scale = w.detach().float() * (norm.running_var.float() + eps).rsqrt()
    return scale, b.detach().float() - norm.running_mean.float() * scale


def output_size(body: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of a backbone body's output for an input (H, W): main-path convs and pools in order."""
    h, w = size
    for name, m in body.named_modules():
        if "downsample" in name or not isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            continue
        k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in (m.kernel_size, m.stride, m.padding,
                                                                      m.dilation))
        h = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        w = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return h, w
