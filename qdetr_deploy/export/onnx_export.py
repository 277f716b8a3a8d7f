"""``export_onnx``: a (quantized) DETR checkpoint -> one ONNX Q/DQ graph built by hand, plus its sidecar JSON.

The graph follows the model's own modules: ``export/lower/`` has one lowering rule per module kind, each
composite module's rule lowering its children in the order of its forward; the numeric rules (Q/DQ, batch
norm folding, int32 biases) are ``folding.py``'s. With no mask input the sine position embedding and the
query embedding are constants for the fixed (H, W), computed in torch and stored as initializers. The
decoder starts from a zero target of shape [Q,1,D], broadcast against the batch like the constants. Only
the last decoder layer's output feeds the heads (no auxiliary outputs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, external_data_helper, helper
from torch import nn

from qdetr_deploy.checkpoints import Checkpoint, load_checkpoint
from qdetr_deploy.deploy_format import (
    METADATA_KEY,
    ONNX_FORMAT,
    class_names_of,
    default_size,
    model_metadata,
    sha256_file,
)
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.export.folding import CONTAINERS, CONV_BIASES, TARGETS, Ctx
from qdetr_deploy.export.graph import GraphBuilder
from qdetr_deploy.export.lower import LowerCtx, check_rules, lower
from qdetr_deploy.export.lower.heads import POSTPROCESS, SCORING
from qdetr_deploy.export.ort_fusion import fuse_matmul_bias
from qdetr_deploy.export.trt_lint import DEFAULT_TRT_VERSION, check_trt_version, opset_range
from qdetr_deploy.io import atomic_path, check_output_path, write_json
from qdetr_deploy.quant.api import is_quantized

QUANTIZERS_KEY = "qdetr_quantizers"  # where each activation quantizer's codes live (used by the check)
MIN_OPSET, MAX_OPSET, INT4_OPSET = 17, 21, 21
DEFAULT_OPSET = 21
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's 2 GB limit, with a margin
# The fast flags are the defaults (docs/BENCHMARKS.md): for onnxruntime every weight in an 8-bit container
# (integer kernels; "int4" is the smallest file) and conv biases on the int32 grid (QLinearConv).
DEFAULT_CONV_BIAS = {"onnxruntime": "int32", "tensorrt": "float"}
DEFAULT_CONTAINER = {"onnxruntime": "int8", "tensorrt": "int4"}


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and decided."""

    path: Path
    sidecar: Path
    metadata: dict[str, Any]
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    act_modes: dict[str, int] = field(default_factory=dict)
    #: convs whose bias the int32 export moved (a model without QuantConfig.conv_bias="int32")
    rounded_biases: list[str] = field(default_factory=list)


def build_onnx(model: nn.Module, image_size: tuple[int, int], *, opset: int | None = None,
               target: str = "onnxruntime", trt_version: str = DEFAULT_TRT_VERSION,
               batch: int | None = 1, postprocess: bool = True, weight_container: str | None = None,
               strict_trt: bool = False, conv_bias: str | None = None) -> tuple[onnx.ModelProto, Ctx]:
    """Build the ONNX graph of ``model`` (float or quantized DETR, eval semantics) for a fixed (H, W) canvas.

    ``opset`` None: :func:`default_opset` (the tensorrt target: the highest ``trt_version`` documents, at
    most 21). ``batch=None`` makes the batch dimension dynamic. ``conv_bias``: "float" (exact separate bias
    Add) or "int32" (onnxruntime: conv biases on the int32 grid where the conv can become QLinearConv,
    folding.conv_relu_quant; exact for a model quantized with QuantConfig.conv_bias="int32", rounded and
    recorded otherwise); None: the target's default (:data:`DEFAULT_CONV_BIAS`). ``weight_container``
    None: the target's default (:data:`DEFAULT_CONTAINER`). Returns the model (no metadata yet) and the
    build context (activation records, fallbacks).
    """
    opset = opset or default_opset(target, trt_version)
    container = _check_options(model, opset, target, weight_container)
    conv_bias = _check_conv_bias(conv_bias, target)
    check_rules(model)
    H, W = int(image_size[0]), int(image_size[1])
    names = {m: n for n, m in model.named_modules()}
    ctx = LowerCtx(GraphBuilder(opset), target, container, conv_bias=conv_bias, names=names,
                   image_size=(H, W))
    g = ctx.g
    with torch.no_grad():
        logits, boxes = lower(ctx, model, "images")
    if strict_trt and target == "tensorrt" and ctx.fallbacks:
        raise QDetrError(_strict_message(ctx.fallbacks))
    b = batch if batch else "batch"
    q, c = model.num_queries, model.class_embed.out_features
    if postprocess:
        scores, labels, xyxy = POSTPROCESS[type(model)](ctx, model, logits, boxes, (H, W))
        outs = [("scores", scores, TensorProto.FLOAT, [b, q]), ("labels", labels, TensorProto.INT64, [b, q]),
                ("boxes", xyxy, TensorProto.FLOAT, [b, q, 4])]
    else:
        outs = [("pred_logits", logits, TensorProto.FLOAT, [b, q, c]),
                ("pred_boxes", boxes, TensorProto.FLOAT, [b, q, 4])]
    for name, tensor, _, _ in outs:
        g.rename_output(tensor, name)
    internal = {"pred_logits": logits, "pred_boxes": boxes} if postprocess else {}
    if postprocess and ctx.topk_index:
        internal["topk_index"] = ctx.topk_index
    if target == "onnxruntime":
        fuse_matmul_bias(g)
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [b, 3, H, W])]
    outputs = [helper.make_tensor_value_info(n, t, s) for n, _, t, s in outs]
    onnx_model = g.model(inputs, outputs)
    records = {**_records_json(ctx, internal), "scoring": SCORING[type(model)]}
    _set_props(onnx_model, {QUANTIZERS_KEY: json.dumps(records)})
    return onnx_model, ctx


def export_onnx(checkpoint: str | os.PathLike | Checkpoint, output: str | os.PathLike, *,
                opset: int | None = None, target: str = "onnxruntime", trt_version: str = DEFAULT_TRT_VERSION,
                image_size: tuple[int, int] | None = None, batch: int = 1,
                dynamic_batch: bool = False, postprocess: bool = True, weight_container: str | None = None,
                strict_trt: bool = False, trust: bool = False, conv_bias: str | None = None) -> ExportResult:
    """Export a checkpoint (path or loaded :class:`Checkpoint`) to ``output`` (.onnx) and its sidecar
    ``output.json``; both written atomically, nothing written on error."""
    output = check_output_path(output)
    if batch < 1:
        raise QDetrError(f"--batch must be >= 1, got {batch}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, trust=trust)
    model = ckpt.model.eval()
    check_trt_version(trt_version)
    opset = opset or default_opset(target, trt_version)
    _check_options(model, opset, target, weight_container)
    _check_conv_bias(conv_bias, target)
    size = tuple(image_size) if image_size else default_size(ckpt.meta)
    onnx_model, ctx = build_onnx(model, size, opset=opset, target=target, trt_version=trt_version,
                                 batch=None if dynamic_batch else batch, postprocess=postprocess,
                                 weight_container=weight_container, strict_trt=strict_trt,
                                 conv_bias=conv_bias)
    metadata = export_metadata(ckpt, size, target=target, postprocess=postprocess,
                               batch=None if dynamic_batch else batch)
    _set_props(onnx_model, {METADATA_KEY: json.dumps(metadata)})
    save_onnx(onnx_model, output)
    sidecar = write_json(output.with_name(output.name + ".json"), metadata)
    modes: dict[str, int] = {}
    for r in ctx.g.acts:
        modes[r.mode] = modes.get(r.mode, 0) + 1
    rounded = [conv for conv, (_, delta) in ctx.bias_deltas.items() if any(delta)]
    return ExportResult(output, sidecar, metadata, list(ctx.fallbacks), modes, rounded)


def export_metadata(ckpt: Checkpoint, size: tuple[int, int], *, target: str, postprocess: bool,
                    batch: int | None) -> dict[str, Any]:
    """The ``qdetr`` metadata of docs/ARCHITECTURE.md "ONNX model"."""
    cfg, qcfg = ckpt.detr_config, ckpt.quant_config if is_quantized(ckpt.model) else None
    return model_metadata(
        format=ONNX_FORMAT, input_size=size, class_names=class_names_of(cfg), category_ids=ckpt.category_ids,
        num_classes=cfg.num_classes, postprocess=postprocess, batch=batch, bits=qcfg.bits if qcfg else "fp32",
        quant_config=qcfg.to_dict() if qcfg else None, target=target,
        source={"path": str(ckpt.path), "sha256": sha256_file(ckpt.path)},
        scoring=SCORING[type(ckpt.model)])  # how raw pred_logits become detections (bench, predict)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically; models over 2 GB keep their initializers in ``<name>.data`` beside the file."""
    path = Path(path)
    weights = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if weights < EXTERNAL_DATA_BYTES:
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
        return path
    data = path.with_name(path.name + ".data")
    with atomic_path(data) as tmp_data:
        external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                            location=tmp_data.name, size_threshold=1024)
        external_data_helper.write_external_data_tensors(model, str(path.parent))
        for tensor in model.graph.initializer:  # the builder puts every tensor in the initializers
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        with atomic_path(path) as tmp:
            onnx.save_model(model, str(tmp))
    return path


# --- helpers -----------------------------------------------------------------------------------------------

def default_opset(target: str, trt_version: str = DEFAULT_TRT_VERSION) -> int:
    """21 (INT4 tensors), or for TensorRT the highest opset ``trt_version``'s parser documents (10.3: 20, so
    its export has no INT4: convs and quantized layers use the int8 container anyway)."""
    if target != "tensorrt":
        return DEFAULT_OPSET
    return max(MIN_OPSET, min(DEFAULT_OPSET, opset_range(trt_version)[1]))


def _check_options(model: nn.Module, opset: int, target: str, container: str | None) -> str:
    """Validate the export options against the model; returns the weight container in effect."""
    if target not in TARGETS:
        raise QDetrError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if container is not None and container not in CONTAINERS:
        raise QDetrError(f"unknown weight container {container!r}: use int4 or int8")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise QDetrError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET}")
    container = container or DEFAULT_CONTAINER[target]
    low_bits = [name for name, m in model.named_modules() if getattr(m, "w_bits", 8) <= 4]
    if container == "int4" and low_bits and opset < INT4_OPSET and target != "tensorrt":
        raise QDetrError(f"opset {opset} has no INT4 tensors but {low_bits[0]} has <= 4-bit weights: "
                         f"use --opset {INT4_OPSET} or --weight-container int8")
    return container


def _check_conv_bias(conv_bias: str | None, target: str) -> str:
    """The conv-bias mode in effect: validated, None -> the target's default."""
    conv_bias = conv_bias or DEFAULT_CONV_BIAS[target]
    if conv_bias not in CONV_BIASES:
        raise QDetrError(f"unknown conv bias {conv_bias!r}: use float or int32")
    if conv_bias == "int32" and target != "onnxruntime":
        raise QDetrError("--conv-bias int32 is for the onnxruntime target (QLinearConv)")
    return conv_bias


def _strict_message(fallbacks: list[tuple[str, str]]) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in fallbacks:
        by_reason.setdefault(reason, []).append(name)
    groups = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in by_reason.items())
    return (f"--strict-trt: {len(fallbacks)} activation quantizers cannot be zero-point-0 per-tensor int8 "
            f"Q/DQ for TensorRT ({groups})")


def _records_json(ctx: Ctx, internal: dict[str, str]) -> dict[str, Any]:
    acts = []
    for r in ctx.g.acts:
        d = asdict(r)
        d["shift"] = [int(s) for s in np.asarray(r.shift).reshape(-1)]
        acts.append(d)
    return {"acts": acts, "tensors": internal, "target": ctx.target, "container": ctx.container,
            "conv_bias": ctx.conv_bias,
            "bias_deltas": {conv: {"module": m, "delta": d} for conv, (m, d) in ctx.bias_deltas.items()},
            "int_convs": ctx.int_convs}


def _set_props(model: onnx.ModelProto, props: dict[str, str]) -> None:
    merged = {p.key: p.value for p in model.metadata_props}
    merged.update(props)
    del model.metadata_props[:]
    helper.set_model_props(model, merged)
