"""DETR's data augmentation (facebookresearch/detr ``datasets/transforms.py``), re-implemented compactly.

Every transform is called as ``image, target = t(image, target)``; ``image`` is a PIL image until
:class:`ToTensor`, ``target`` is ``None`` or the dict built by :class:`~qdetr_deploy.data.coco.CocoDetection`
with ``boxes`` as xyxy pixels. :class:`Normalize` is the last step: it normalises the image with the ImageNet
mean/std and turns the boxes into normalised cx,cy,w,h (the model's convention). Randomness uses Python's
``random`` module, as upstream (seed it, and the DataLoader's workers, for reproducible runs).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from qdetr_deploy.deploy_format import IMAGENET_MEAN, IMAGENET_STD
from qdetr_deploy.models.box_ops import box_xyxy_to_cxcywh

Target = dict[str, Any] | None
Transform = Callable[[Any, Target], tuple[Any, Target]]


def _image_wh(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def crop(image: Any, target: Target, region: tuple[int, int, int, int]) -> tuple[Any, Target]:
    """Crop ``region = (top, left, height, width)``; boxes are clipped and boxes left empty are dropped."""
    i, j, h, w = region
    image = F.crop(image, i, j, h, w)
    if target is None:
        return image, None
    target = dict(target)
    target["size"] = torch.tensor([h, w])
    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([j, i, j, i], dtype=torch.float32)
        boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([w, h], dtype=torch.float32)).clamp(min=0)
        target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        target["boxes"] = boxes.reshape(-1, 4)
        keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
        for key in ("boxes", "labels", "area", "iscrowd"):
            if key in target:
                target[key] = target[key][keep]
    return image, target


def hflip(image: Any, target: Target) -> tuple[Any, Target]:
    """Mirror the image left-right and the boxes with it."""
    w, _ = _image_wh(image)
    image = F.hflip(image)
    if target is not None and "boxes" in target:
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor(
            [w, 0, w, 0], dtype=boxes.dtype
        )
    return image, target


def get_size(image_wh: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Upstream's resize rule: shorter side -> ``size`` unless the longer side would exceed ``max_size``.

    Returns ``(h, w)``.
    """
    w, h = image_wh
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image: Any, target: Target, size: int, max_size: int | None = None) -> tuple[Any, Target]:
    """Resize keeping the aspect ratio (see :func:`get_size`); boxes and area are scaled with the image."""
    old_w, old_h = _image_wh(image)
    new_h, new_w = get_size((old_w, old_h), size, max_size)
    image = F.resize(image, [new_h, new_w])
    if target is None:
        return image, None
    rw, rh = new_w / old_w, new_h / old_h
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([rw, rh, rw, rh], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        return hflip(image, target) if random.random() < self.p else (image, target)


class RandomResize:
    """Resize the shorter side to a size drawn from ``sizes`` (longer side capped at ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region with sides in ``[min_size, max_size]`` (clipped to the image)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        img_w, img_h = _image_wh(image)
        w = random.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        h = random.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        return crop(image, target, T.RandomCrop.get_params(image, [h, w]))


class RandomSelect:
    """Apply ``t1`` with probability ``p``, else ``t2``."""

    def __init__(self, t1: Transform, t2: Transform, p: float = 0.5) -> None:
        self.t1, self.t2, self.p = t1, t2, p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        return self.t1(image, target) if random.random() < self.p else self.t2(image, target)


class ToTensor:
    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        return F.to_tensor(image), target


class Normalize:
    """Image: ToTensor if needed, then (x - mean) / std. Boxes: xyxy pixels -> normalised cx,cy,w,h."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Any, target: Target) -> tuple[torch.Tensor, Target]:
        if not isinstance(image, torch.Tensor):
            image = F.to_tensor(image)
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            h, w = image.shape[-2:]
            boxes = box_xyxy_to_cxcywh(target["boxes"])
            target["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(type(t).__name__ for t in self.transforms)
        return f"Compose([{inner}])"


DEFAULT_SCALES = tuple(range(480, 801, 32))


def make_train_transforms(
    scales: Sequence[int] = DEFAULT_SCALES,
    max_size: int = 1333,
    crop: tuple[int, int] | None = (384, 600),
    crop_resize: Sequence[int] = (400, 500, 600),
) -> Compose:
    """Upstream's COCO training augmentation: flip, then either a multi-scale resize or
    resize-to-``crop_resize`` + random crop in ``crop`` + multi-scale resize. ``crop=None`` drops the crop
    branch (useful for tiny images, e.g. ``scales=(96,), max_size=96, crop=None``)."""
    multiscale = RandomResize(scales, max_size=max_size)
    steps: list[Transform] = [RandomHorizontalFlip()]
    if crop is None:
        steps.append(multiscale)
    else:
        cropped = Compose([RandomResize(crop_resize), RandomSizeCrop(*crop), multiscale])
        steps.append(RandomSelect(multiscale, cropped))
    steps.append(Normalize())
    return Compose(steps)


def make_eval_transforms(size: int = 800, max_size: int = 1333) -> Compose:
    """Upstream's evaluation transform: shorter side -> ``size`` (longer side <= ``max_size``), normalise."""
    return Compose([RandomResize([size], max_size=max_size), Normalize()])
