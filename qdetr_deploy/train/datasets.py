"""The data of a training run: the COCO-format sets, the resolved label mode, the train and val loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from qdetr_deploy.data import CocoDetection, collate_fn, make_eval_transforms, make_train_transforms
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.train import distributed as D
from qdetr_deploy.train.config import TrainConfig


@dataclass
class Data:
    """The datasets of a run and the class mapping the checkpoint records."""

    train: CocoDetection
    val: CocoDetection | None
    label_mode: str

    @property
    def category_ids(self) -> list[int]:
        return list(self.train.category_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self.train.class_names)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def load_data(config: TrainConfig, model_classes: int | None = None) -> Data:
    """Training (and validation) sets with the resolved label mode (see ``TrainConfig.label_mode``).

    ``model_classes``: the class count of the model to be trained, when it is fixed (for "auto")."""
    mode = "contiguous" if config.label_mode == "auto" else config.label_mode
    train_tf = make_train_transforms(config.train_scales(), config.max_size,
                                     crop=(384, 600) if config.use_crop() else None)
    ds = CocoDetection(config.images, config.ann, train_tf, mode, config.on_bad_image)
    if config.label_mode == "auto" and model_classes is not None and model_classes != ds.num_classes:
        if model_classes == max(ds.category_ids) + 1:
            mode = "category_id"
            ds = CocoDetection(config.images, config.ann, train_tf, mode, config.on_bad_image)
    val = None
    if config.val_images is not None:
        val = CocoDetection(config.val_images, config.val_ann, make_eval_transforms(config.image_size,
                            config.max_size), mode, config.on_bad_image)
        if val.category_ids != ds.category_ids:
            raise QDetrError("the validation set has other categories than the training set", config.val_ann)
    return Data(ds, val, mode)


def check_classes(model_classes: int, data: Data, config: TrainConfig) -> None:
    if model_classes != data.num_classes:
        raise QDetrError(f"the model has {model_classes} classes but the training set has {data.num_classes} "
                         f"({data.label_mode} labels)", config.ann)


def train_loader(data: Data, config: TrainConfig, env: D.DistEnv) -> tuple[DataLoader, D.ShardedEpochSampler]:
    """The training loader (seeded per sample, sharded over ranks, last partial batch dropped)."""
    sampler = D.ShardedEpochSampler(len(data.train), True, config.seed, env.rank, env.world_size)
    if len(sampler) < config.batch_size:
        raise QDetrError(f"{len(data.train)} training images are fewer than batch size {config.batch_size} x "
                         f"{env.world_size} processes", config.ann)
    loader = DataLoader(D.SeededDataset(data.train), batch_size=config.batch_size, sampler=sampler,
                        drop_last=True, collate_fn=collate_fn, num_workers=config.workers,
                        persistent_workers=config.workers > 0, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    return loader, sampler


def val_loader(data: Data, config: TrainConfig) -> DataLoader | None:
    if data.val is None:
        return None
    return DataLoader(data.val, batch_size=config.batch_size, sampler=D.distributed_sampler(data.val),
                      collate_fn=collate_fn, num_workers=min(config.workers, 2))
