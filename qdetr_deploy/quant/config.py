"""``QuantConfig``: what gets quantized, to how many bits, and where distribution alignment sits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qdetr_deploy.errors import QDetrError

SUPPORTED_BITS = (2, 3, 4, 8)
DA_PLACEMENTS = ("none", "self", "cross", "both")
GRANULARITIES = ("tensor", "channel")
SIGN_RULES = ("auto", "signed")
ZERO_POINTS = ("learned", "zero")
CONV_BIASES = ("float", "int32")
# Deployment presets (``quantize --preset``): QuantConfig fields on top of the paper's placement.
# "onnxruntime": an integer ResNet between the image and the transformer: both inputs of every residual add
# at 8 bits, conv biases on the int32 grid, 8-bit downsample convs and each block's input quantized once
# (its 8-bit codes read by the block's first conv and downsample) and an 8-bit input_proj, so that ONNX
# Runtime runs every backbone conv as QLinearConv, every add as QLinearAdd and the max pooling on uint8, and
# the export equals the model exactly (docs/BENCHMARKS.md). "paper": QDETR_METHOD.md.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "onnxruntime": {"residual_bits": 8, "conv_bias": "int32", "downsample_bits": 8,
                    "shared_block_input": True, "input_proj_bits": 8},
}

# Layers kept in full precision (QDETR_METHOD.md §1): downsample 1x1 convs, input_proj, the heads.
# LayerNorm, softmax and residual adds are never swapped (``residual_bits`` adds input quantizers to the
# residual adds of ResNet blocks, a deployment option outside the paper's method).
# Patterns are fnmatch patterns on module names.
DEFAULT_FP_MODULES = (
    "backbone.0.body.layer*.*.downsample.*",
    "input_proj",
    "class_embed",
    "bbox_embed.*",
)


@dataclass
class QuantConfig:
    """How to quantize a DETR (Q-DETR, QDETR_METHOD.md §1-§2).

    w_bits / a_bits: weights and input activations of backbone convs, FFN and attention projections.
    attn_bits: q, k, v and the softmax output inside attention.
    act_granularity: "tensor" (one step per tensor: every runtime deploys it) or "channel" (per channel for
        conv/linear inputs and per head inside attention, as in the released Q-DETR code).
    da: distribution alignment of decoder queries: "none", "self" (decoder self-attention, released code),
        "cross" (decoder cross-attention, the paper's text) or "both".
    act_sign: "auto" (released code: unsigned range when the first calibration batch has no value below
        -1e-5, signed otherwise) or "signed" (always the paper's signed range).
    stem_bits: bits of the first (stem) convolution's weights and input.
    act_zero_point: "learned" (LSQ+, the paper: an integer zero point per activation quantizer) or "zero"
        (for TensorRT, which takes only zero-point-0 int8 activations: zero points stay 0 and 8-bit
        activations use the signed range, so every activation quantizer exports as TensorRT int8 Q/DQ
        exactly; sub-8-bit unsigned ranges go through the clip identity). Choose it before distillation.
    residual_bits: None (the paper: residual adds in full precision) or 8: quantize both inputs of every
        ResNet block's residual add per tensor: the branch (the output of its last conv + batch norm) and
        the identity (the previous block's output, quantized after its final ReLU). A deployment option:
        the last conv gets a quantized output and the add quantized inputs and output, so ONNX Runtime
        runs them as QLinearConv and QLinearAdd (docs/BENCHMARKS.md) and TensorRT gives the conv an int8
        output (the unsigned block output has no int8 zero-point-0 form: the TensorRT export writes it as
        exact float fake quantization). It changes the model (two more 8-bit roundings per block), so
        choose it before distillation.
    conv_bias: "float" (the paper) or "int32": the batch norm after every bias-free quantized conv with a
        per-tensor input quantizer fake-quantizes its folded bias on the int32 grid x_step * w_step *
        gamma/sigma (quant/int_bias.py), the bias ONNX Runtime's QLinearConv adds; the onnxruntime export
        then needs no rounding of its own (parity exact). A deployment option: choose it before
        distillation.
    downsample_bits: None (the paper: the ResNet downsample 1x1 convs stay full precision) or the bits of
        their weights and input; with ``residual_bits`` their batch norm's output (the identity input of the
        residual add) is quantized at ``residual_bits`` too. A deployment option (ONNX Runtime then runs
        them as QLinearConv); choose it before distillation.
    shared_block_input: False (the paper: every conv quantizes its own input at ``a_bits``) or True (needs
        ``residual_bits``): each ResNet block's input is quantized once, at ``residual_bits``, by the
        quantizer that made it (the previous block's ``out_act``; for the first block a new ``out_act`` of the
        stem's max pooling), and the block's first conv (and quantized downsample) read those codes instead
        of re-quantizing them at ``a_bits`` (their ``act`` is that quantizer, not a submodule of their own).
        The first convs then take 8-bit inputs. A deployment option: no requantization between blocks in
        ONNX Runtime; choose it before distillation.
    input_proj_bits: None (the paper: DETR's input_proj 1x1 conv stays full precision) or the bits of its
        weights and input. The backbone's last conv then has a quantized output (QLinearConv in ONNX Runtime);
        under ``shared_block_input`` input_proj reads the last ResNet block's codes. A deployment option;
        choose it before distillation.
    fp_modules: fnmatch patterns of module names that stay full precision.
    """

    w_bits: int = 4
    a_bits: int = 4
    attn_bits: int = 8
    act_granularity: str = "tensor"
    da: str = "self"
    act_sign: str = "auto"
    stem_bits: int = 8
    residual_bits: int | None = None
    act_zero_point: str = "learned"
    conv_bias: str = "float"
    downsample_bits: int | None = None
    shared_block_input: bool = False
    input_proj_bits: int | None = None
    fp_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_FP_MODULES)

    def __post_init__(self) -> None:
        self.fp_modules = tuple(self.fp_modules)
        for name in ("w_bits", "a_bits", "attn_bits", "stem_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise QDetrError(f"{name}={bits} is not supported: choose one of {list(SUPPORTED_BITS)}")
        if self.residual_bits not in (None, *SUPPORTED_BITS):
            raise QDetrError(f"residual_bits={self.residual_bits} is not supported: choose none or one of "
                             f"{list(SUPPORTED_BITS)}")
        for name in ("downsample_bits", "input_proj_bits"):
            if getattr(self, name) not in (None, *SUPPORTED_BITS):
                raise QDetrError(f"{name}={getattr(self, name)} is not supported: choose none or one of "
                                 f"{list(SUPPORTED_BITS)}")
        if self.shared_block_input and self.residual_bits is None:
            raise QDetrError("shared_block_input needs residual_bits: the block inputs are quantized by the "
                             "residual quantizers")
        _check_choice("da", self.da, DA_PLACEMENTS)
        _check_choice("act_granularity", self.act_granularity, GRANULARITIES)
        _check_choice("act_sign", self.act_sign, SIGN_RULES)
        _check_choice("act_zero_point", self.act_zero_point, ZERO_POINTS)
        _check_choice("conv_bias", self.conv_bias, CONV_BIASES)

    @classmethod
    def from_bits(cls, bits: str, **kwargs: Any) -> QuantConfig:
        """``QuantConfig.from_bits("4-4-8")``: weight-activation-attention bits."""
        parts = str(bits).split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise QDetrError(f"bits {bits!r} must look like W-A-ATTN, e.g. 4-4-8")
        w, a, attn = (int(p) for p in parts)
        return cls(w_bits=w, a_bits=a, attn_bits=attn, **kwargs)

    @classmethod
    def from_preset(cls, preset: str, bits: str = "4-4-8", **kwargs: Any) -> QuantConfig:
        """``QuantConfig.from_preset("onnxruntime", "4-4-8")``: a :data:`PRESETS` entry; ``kwargs`` that are
        not None override it (``residual_bits``, ``downsample_bits`` and ``input_proj_bits`` may be given as
        "none" or "8", as on the command line; ``residual_bits`` "none" also turns the preset's
        ``shared_block_input`` off)."""
        if preset not in PRESETS:
            raise QDetrError(f"unknown preset {preset!r}: choose one of {list(PRESETS)}")
        overrides = {k: v for k, v in kwargs.items() if v is not None}
        for key in ("residual_bits", "downsample_bits", "input_proj_bits"):
            if isinstance(overrides.get(key), str):
                v = overrides[key]
                overrides[key] = None if v == "none" else int(v) if v.isdigit() else v
        if overrides.get("residual_bits", 0) is None and "shared_block_input" not in overrides:
            overrides["shared_block_input"] = False  # the preset's sharing needs the residual quantizers
        return cls.from_bits(bits, **{**PRESETS[preset], **overrides})

    @property
    def bits(self) -> str:
        return f"{self.w_bits}-{self.a_bits}-{self.attn_bits}"

    def da_on(self, kind: str) -> bool:
        """Whether DA applies to decoder attention of ``kind`` ("self" or "cross")."""
        return self.da in (kind, "both")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fp_modules"] = list(self.fp_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QDetrError(f"unknown QuantConfig fields {unknown}")
        return cls(**d)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QDetrError(f"{name}={value!r} is not one of {list(choices)}")
