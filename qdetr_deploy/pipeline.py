"""Whole-pipeline library functions: a checkpoint in, a checkpoint out, each behind one CLI command.

``quantize_checkpoint`` (``qdetr-deploy quantize``): full-precision teacher -> quantized, calibrated student.
The other stages have their own homes: ``train.loop.train``, ``train.distill.distill``,
``export.onnx_export.export_onnx``, ``export.torch_engine.build_torch_engine``, ``demo.run_demo``.
"""

from __future__ import annotations

import os
from pathlib import Path

from qdetr_deploy.checkpoints import load_checkpoint, save_checkpoint
from qdetr_deploy.deploy_format import sha256_file
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.calibration import image_batches, list_images
from qdetr_deploy.io import check_output_path
from qdetr_deploy.models.smca_detr import SMCADETR
from qdetr_deploy.quant import CALIBRATION_METHODS, QuantConfig, calibrate, is_quantized, quantize


def quantize_checkpoint(teacher: str | os.PathLike, output: str | os.PathLike, *, bits: str = "4-4-8",
                        calib: str | os.PathLike, calib_size: int = 32, method: str = "lsq+",
                        image_size: tuple[int, int] = (800, 800), batch_size: int = 4,
                        act_granularity: str = "tensor", da: str = "none", trust: bool = False,
                        progress: bool = True, preset: str = "onnxruntime",
                        residual_bits: int | str | None = None, act_zero_point: str | None = None,
                        conv_bias: str | None = None, downsample_bits: int | str | None = None,
                        input_proj_bits: int | str | None = None,
                        shared_block_input: bool | None = None) -> Path:
    """Load a full-precision checkpoint (ours or upstream .pth), quantize it to ``bits``, calibrate every step
    on ``calib_size`` images of ``calib`` and save the student (.safetensors) with its provenance.
    ``preset``: a deployment preset of QuantConfig (``quant.config.PRESETS``: "onnxruntime", the default,
    or "paper", the method exactly; the onnxruntime preset's fields are for ResNet and tiny backbones, so an
    SMCA-DETR gets "paper", its released placement); ``residual_bits``, ``downsample_bits`` and
    ``input_proj_bits`` ("none" or 8), ``shared_block_input``, ``act_zero_point``, ``conv_bias``:
    QuantConfig fields overriding the preset where not None. ``da``: "none" by default (docs/RESULTS.md:
    DA did not beat LSQ+)."""
    output = check_output_path(output)
    if method not in CALIBRATION_METHODS:
        raise QDetrError(f"calibration method {method!r} is not one of {list(CALIBRATION_METHODS)}")
    if calib_size < 1 or batch_size < 1:
        raise QDetrError("--calib-size and --batch-size must be >= 1")
    QuantConfig.from_preset(preset, bits)  # bad preset or bits: refused before anything is loaded
    files = list_images(calib, calib_size)
    ckpt = load_checkpoint(teacher, trust=trust)
    if is_quantized(ckpt.model):
        raise QDetrError("checkpoint is already quantized: quantize needs a full-precision teacher", teacher)
    if isinstance(ckpt.model, SMCADETR) and preset == "onnxruntime":
        preset = "paper"
    config = QuantConfig.from_preset(preset, bits, act_granularity=act_granularity, da=da,
                                     residual_bits=residual_bits, act_zero_point=act_zero_point,
                                     conv_bias=conv_bias, downsample_bits=downsample_bits,
                                     input_proj_bits=input_proj_bits, shared_block_input=shared_block_input)
    model = quantize(ckpt.model.eval(), config)
    size = (int(image_size[0]), int(image_size[1]))
    calibrate(model, image_batches(files, size, batch_size), method=method, progress=progress)
    meta = {
        "stage": "quantized",
        "source": {"path": str(teacher), "sha256": sha256_file(teacher), "meta": ckpt.meta},
        "calibration": {"images": str(calib), "count": len(files), "method": method,
                        "image_size": list(size), "batch_size": batch_size},
        "preset": preset, "quant_config": config.to_dict(),
    }
    return save_checkpoint(model, output, category_ids=ckpt.category_ids, meta=meta)
