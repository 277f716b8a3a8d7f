"""COCO-format datasets, DETR's transforms and the procedural shapes set."""

from qdetr_deploy.data.coco import CocoDetection, collate_fn, load_image
from qdetr_deploy.data.shapes import SHAPE_KINDS, make_shapes_dataset
from qdetr_deploy.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    make_eval_transforms,
    make_train_transforms,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_KINDS",
    "CocoDetection",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "ToTensor",
    "collate_fn",
    "load_image",
    "make_eval_transforms",
    "make_shapes_dataset",
    "make_train_transforms",
]
