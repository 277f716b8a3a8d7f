"""The released Q-DETR checkpoint format (github.com/Hzbupahaozi/Q-DETR): a quantized SMCA-DETR.

Recognised by its keys (LearnableBias ``backbone.0.body.layer1.0.bias11.bias``, DA ``...norm_q.scale``,
``query_embed.weight`` of width 2 * d_model). The model-zoo files are ``{'model': state_dict}`` of float32
tensors; training files also pickle ``args`` (``args.n_bit`` gives the bits). Bits are not stored in zoo
files: the caller passes them (``--bits 4-4-8`` / ``2-2-8``). Parameters map 1:1 by name onto
:class:`~qdetr_deploy.models.SMCADETR` quantized by :func:`~qdetr_deploy.quant.quantize` with
:func:`released_quant_config`; only shapes differ (weight steps [C] -> [C,1,..], ``signed`` [1] -> []).
Keys the released forward never reads (aliases, unused quantizers: uninitialised memory in the published
files) are skipped without being read; other unknown keys are listed in one warning.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.models import SMCAConfig, build_smca_detr
from qdetr_deploy.quant import QuantConfig, quantize

log = logging.getLogger(__name__)

FORMAT_NAME = "released Q-DETR format"
BODY = "backbone.0.body."
MARKER_KEYS = (f"{BODY}layer1.0.bias11.bias", "transformer.decoder.layers.0.self_attn.norm_q.scale")

# keys of the released state dict that its eval forward never reads (FIXTURE.md section 6.2)
UNUSED_PATTERNS = (
    "*.in_proj_weight", "*.in_proj_bias",  # aliases of in_proj.weight / in_proj.bias
    "*attn.in_proj.act.*", "*attn.out_proj.act.*",  # attention projections: no input quantizer
    "*.multihead_attn.in_proj.alpha", "*.multihead_attn.in_proj.init_state",  # cross-attn: float
    "*.multihead_attn.out_proj.alpha", "*.multihead_attn.out_proj.init_state",
    "*.multihead_attn.norm_q.*",  # no DA in cross-attention
    "*.norm_q.init_state",  # train-only flag
)


def is_released_state(state: dict[str, Any]) -> bool:
    """Whether a state dict is in the released Q-DETR (quantized SMCA-DETR) format."""
    qe = state.get("query_embed.weight")
    return (all(k in state for k in MARKER_KEYS) and isinstance(qe, torch.Tensor) and qe.dim() == 2
            and any(k.endswith(".point1.layers.0.weight") for k in state))


def _count(state: dict[str, Any], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def infer_smca_config(state: dict[str, torch.Tensor], path: Path | None = None) -> SMCAConfig:
    """Sizes of the SMCA-DETR read off a released state dict (blocks, widths, layers, FFN, queries)."""
    try:
        qe = state["query_embed.weight"]
        layers = tuple(_count(state, f"{BODY}layer{s}.") for s in range(1, 5))
        width = state[f"{BODY}layer1.0.conv1.weight"].shape[0]  # planes 64 -> width_per_group
        cfg = SMCAConfig(
            backbone_layers=layers, width_per_group=width, hidden_dim=qe.shape[1] // 2,
            nheads=state["transformer.decoder.layers.0.self_attn.q_act.alpha"].numel(),
            enc_layers=_count(state, "transformer.encoder.layers."),
            dec_layers=_count(state, "transformer.decoder.layers."),
            dim_feedforward=state["transformer.decoder.layers.0.linear1.weight"].shape[0],
            num_queries=qe.shape[0], num_classes=state["class_embed.weight"].shape[0] - 1)
    except KeyError as e:
        raise QDetrError(f"{FORMAT_NAME} checkpoint without {e.args[0]}", path) from None
    except ValueError as e:
        raise QDetrError(f"{FORMAT_NAME} checkpoint with unusable sizes ({e})", path) from None
    if cfg.hidden_dim != 256 or cfg.nheads != 8 or cfg.dec_layers < 6:
        raise QDetrError(f"{FORMAT_NAME}: the released SMCA-DETR has d_model 256, 8 heads and >= 6 decoder "
                         f"layers; this file has {cfg.hidden_dim}, {cfg.nheads}, {cfg.dec_layers}", path)
    return cfg


def released_quant_config(bits: str | QuantConfig) -> QuantConfig:
    """The released placement at W-A-8 bits (W = A, e.g. "4-4-8"): per-channel LSQ+ steps, signed flags
    from the file, DA in decoder self-attention, 8-bit stem."""
    q = bits if isinstance(bits, QuantConfig) else QuantConfig.from_bits(bits)
    if q.w_bits != q.a_bits or q.attn_bits != 8:
        raise QDetrError(f"--bits {q.bits}: the released Q-DETR quantizes weights and activations to the "
                         "same n bits and attention to 8 (e.g. --bits 4-4-8 or --bits 2-2-8)")
    return QuantConfig(w_bits=q.w_bits, a_bits=q.a_bits, attn_bits=8, act_granularity="channel", da="self",
                       act_sign="auto", stem_bits=8)


def released_bits(obj: Any, bits: QuantConfig | None, path: Path) -> QuantConfig:
    """The bits to build with: ``args.n_bit`` of a training file, else the caller's ``--bits``."""
    args = obj.get("args") if isinstance(obj, dict) else None
    n_bit = getattr(args, "n_bit", None)
    if n_bit is not None:
        from_file = QuantConfig.from_bits(f"{int(n_bit)}-{int(n_bit)}-8")
        if bits is not None and (bits.w_bits, bits.a_bits, bits.attn_bits) != (n_bit, n_bit, 8):
            raise QDetrError(f"--bits {bits.bits} contradicts the checkpoint's args.n_bit = {n_bit}", path)
        return released_quant_config(from_file)
    if bits is None:
        raise QDetrError(f"{FORMAT_NAME} stores no bit widths: pass --bits 4-4-8 or --bits 2-2-8 (the model "
                         "zoo file's bits)", path)
    return released_quant_config(bits)


def _unused(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in UNUSED_PATTERNS)


def load_released_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Copy a released state dict into a quantized SMCA-DETR; returns the unknown keys (also warned).

    Reads only the keys ``model`` has (each one the forward uses); unused keys are never touched.
    """
    own = model.state_dict()
    # init_state flags are train-only (forced to 1 below): a file saved without them still loads
    missing = [k for k in own if k not in state and not k.endswith("init_state")]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise QDetrError(f"{FORMAT_NAME} checkpoint lacks {missing[0]}{more}, which the forward needs", path)
    unknown = sorted(k for k in state if k not in own and not _unused(k))
    if unknown:
        log.warning("%s: %d unknown key(s) ignored: %s", path, len(unknown), ", ".join(unknown))
    with torch.no_grad():
        for key, target in own.items():
            if key not in state:
                continue  # an init_state flag
            src = state[key]
            if src.numel() != target.numel():
                raise QDetrError(f"{FORMAT_NAME}: {key} has shape {list(src.shape)}, the model needs "
                                 f"{list(target.shape)}", path)
            target.copy_(src.reshape(target.shape).to(target.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("init_state"):  # the released eval never initialises from data
                buf.fill_(1)
    return unknown


def build_released(state: dict[str, torch.Tensor], qconfig: QuantConfig, path: Path) -> nn.Module:
    """The quantized SMCA-DETR of a released state dict (sizes from its shapes, bits from ``qconfig``)."""
    model = quantize(build_smca_detr(infer_smca_config(state, path)), qconfig)
    load_released_state(model, state, path)
    return model.eval()
