"""Calibration images and ``quantize_checkpoint`` (the library function behind ``qdetr-deploy quantize``).

Images go through the deployment preprocessing of the ONNX contract (``bench/preprocess.py``: RGB, resize
to fit the canvas keeping the aspect ratio, normalise, pad bottom/right with zeros), so the steps are
calibrated on exactly what the exported model will see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qdetr_deploy.bench.preprocess import preprocess
from qdetr_deploy.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from qdetr_deploy.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import check_output_path
from qdetr_deploy.quant import CALIBRATION_METHODS, QuantConfig, calibrate, is_quantized, quantize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Image files of ``folder`` (sorted by name, recursive), at most ``limit``; none -> QDetrError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QDetrError("image folder not found" if not folder.exists() else "not a folder", folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise QDetrError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder", folder)
    return files[:limit] if limit else files


def load_images(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Preprocessed canvases [N,3,H,W] float32."""
    return np.stack([preprocess(f, size, IMAGENET_MEAN, IMAGENET_STD).array for f in files])


def image_batches(files: list[Path], size: tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches [B,3,H,W] of preprocessed images, loaded lazily."""
    for i in range(0, len(files), batch_size):
        yield torch.from_numpy(load_images(files[i:i + batch_size], size))


def quantize_checkpoint(teacher: str | os.PathLike, output: str | os.PathLike, *, bits: str = "4-4-8",
                        calib: str | os.PathLike, calib_size: int = 32, method: str = "lsq+",
                        image_size: tuple[int, int] = (800, 800), batch_size: int = 4,
                        act_granularity: str = "tensor", da: str = "self", trust: bool = False,
                        progress: bool = True, residual_bits: int | None = None,
                        act_zero_point: str = "learned") -> Path:
    """Load a full-precision checkpoint (ours or upstream .pth), quantize it to ``bits``, calibrate every step
    on ``calib_size`` images of ``calib`` and save the student (.safetensors) with its provenance.
    ``residual_bits``, ``act_zero_point``: the QuantConfig fields (defaults: the paper's method)."""
    output = check_output_path(output)
    if method not in CALIBRATION_METHODS:
        raise QDetrError(f"calibration method {method!r} is not one of {list(CALIBRATION_METHODS)}")
    if calib_size < 1 or batch_size < 1:
        raise QDetrError("--calib-size and --batch-size must be >= 1")
    config = QuantConfig.from_bits(bits, act_granularity=act_granularity, da=da, residual_bits=residual_bits,
                                   act_zero_point=act_zero_point)
    files = list_images(calib, calib_size)
    ckpt = load_checkpoint(teacher, trust=trust)
    if is_quantized(ckpt.model):
        raise QDetrError("checkpoint is already quantized: quantize needs a full-precision teacher", teacher)
    model = quantize(ckpt.model.eval(), config)
    size = (int(image_size[0]), int(image_size[1]))
    calibrate(model, image_batches(files, size, batch_size), method=method, progress=progress)
    meta = {
        "stage": "quantized",
        "source": {"path": str(teacher), "sha256": file_sha256(teacher), "meta": ckpt.meta},
        "calibration": {"images": str(calib), "count": len(files), "method": method,
                        "image_size": list(size), "batch_size": batch_size},
        "quant_config": config.to_dict(),
    }
    return save_checkpoint(model, output, category_ids=ckpt.category_ids, meta=meta)
