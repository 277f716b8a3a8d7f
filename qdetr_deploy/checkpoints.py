"""The one place that reads and writes checkpoints.

Our format: one safetensors file (``*.safetensors``) holding the state dict, with JSON metadata in its
header: ``format`` ("qdetr-ckpt/1"), ``detr_config``, ``quant_config`` (null for a float model),
``category_ids``, ``meta`` (free-form: stage, source, history). Safetensors cannot execute code, so our
checkpoints need no trust. Upstream facebookresearch/detr checkpoints (``{'model': state_dict, ...}``,
``.pth``) load with ``torch.load(weights_only=True)``; training checkpoints of the upstream repository also
pickle an ``argparse.Namespace`` and need ``trust=True`` (``--trust-checkpoint``).
Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from qdetr_deploy import released
from qdetr_deploy.deploy_format import sha256_file as file_sha256
from qdetr_deploy.errors import QDetrError
from qdetr_deploy.io import atomic_path
from qdetr_deploy.models import DetrConfig, SMCAConfig, build_detr, build_model
from qdetr_deploy.quant import QuantConfig, quantize

FORMAT = "qdetr-ckpt/1"


@dataclass
class Checkpoint:
    """A loaded model with what it was built from."""

    model: nn.Module
    detr_config: DetrConfig | SMCAConfig
    quant_config: QuantConfig | None
    path: Path
    category_ids: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, category_ids: list[int] | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (float or quantized) with its configs to ``path`` (.safetensors), atomically."""
    config: DetrConfig = model.config
    qconfig: QuantConfig | None = getattr(model, "quant_config", None)
    header = {
        "format": FORMAT,
        "detr_config": json.dumps(config.to_dict()),
        "quant_config": json.dumps(qconfig.to_dict() if qconfig else None),
        "category_ids": json.dumps(category_ids),
        "meta": json.dumps(meta or {}),
    }
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=header)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, trust: bool = False, device: str = "cpu",
                    quant_config: QuantConfig | None = None) -> Checkpoint:
    """Load ours (.safetensors), an upstream DETR checkpoint (.pth) or a released Q-DETR checkpoint
    (quantized SMCA-DETR, .pth; ``qdetr_deploy.released``) into a model.

    ``quant_config`` applies to upstream checkpoints (a float model, quantized after loading) and gives
    the bits of a released model-zoo file (which stores none; its training files store ``args.n_bit``).
    """
    path = Path(path)
    if not path.is_file():
        raise QDetrError("checkpoint not found", path)
    if _is_safetensors(path):
        return _load_ours(path, device)
    obj = _torch_load(path, trust)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict) and released.is_released_state(state):
        return _load_released(obj, state, path, quant_config, device)
    ckpt = _load_upstream(obj, state, path, device)
    if quant_config is not None:
        quantize(ckpt.model, quant_config)
        ckpt.quant_config = quant_config
    return ckpt


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def _load_ours(path: Path, device: str) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise QDetrError(f"not a readable checkpoint (truncated or corrupt: {_short(e)})", path) from None
    if header.get("format") != FORMAT:
        raise QDetrError("safetensors file without qdetr-deploy metadata (not a qdetr checkpoint)", path)
    try:
        cdict = json.loads(header["detr_config"])
        config = (SMCAConfig if cdict.get("arch") == "smca" else DetrConfig).from_dict(cdict)
        qdict = json.loads(header["quant_config"])
        qconfig = QuantConfig.from_dict(qdict) if qdict else None
        category_ids = json.loads(header.get("category_ids", "null"))
        meta = json.loads(header.get("meta", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise QDetrError(f"damaged checkpoint metadata ({_short(e)})", path) from None
    model = build_model(config)
    if qconfig is not None:
        quantize(model, qconfig)
    load_state(model, state, path)
    return Checkpoint(model.to(device), config, qconfig, path, category_ids, meta)


def _load_released(obj: Any, state: dict, path: Path, bits: QuantConfig | None, device: str) -> Checkpoint:
    """A released Q-DETR checkpoint (quantized SMCA-DETR); bits from ``args.n_bit`` or ``bits``."""
    qconfig = released.released_bits(obj, bits, path)
    model = released.build_released(state, qconfig, path)
    meta = {"source": released.FORMAT_NAME, "epoch": obj.get("epoch") if isinstance(obj, dict) else None}
    return Checkpoint(model.to(device), model.config, qconfig, path, None, meta)


def _load_upstream(obj: Any, state: Any, path: Path, device: str) -> Checkpoint:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QDetrError("not a DETR checkpoint (expected {'model': state_dict} or a state dict)", path)
    config = infer_detr_config(state, path)
    model = build_detr(config)
    load_state(model, state, path)
    meta = {"source": "upstream", "epoch": obj.get("epoch") if isinstance(obj, dict) else None}
    return Checkpoint(model.to(device), config, None, path, None, meta)


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) and not trust:
            raise QDetrError(
                "checkpoint holds pickled Python objects (e.g. the upstream training args, an "
                "argparse.Namespace) that weights_only loading refuses; pass --trust-checkpoint only if you "
                "trust its source", path) from None
        raise QDetrError(f"not a readable checkpoint ({_short(e)})", path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise QDetrError(f"not a readable checkpoint (truncated or corrupt: {_short(e)})", path) from None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line summary of any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]})")
        raise QDetrError(f"checkpoint does not fit the architecture: {', '.join(parts)}", path)
    model.load_state_dict(state, strict=True)


def infer_detr_config(state: dict[str, torch.Tensor], path: Path | None = None) -> DetrConfig:
    """Read a DETR's hyper-parameters off an upstream state dict (backbone depth, widths, layers)."""
    try:
        hidden = state["query_embed.weight"].shape[1]
        num_queries = state["query_embed.weight"].shape[0]
        num_classes = state["class_embed.weight"].shape[0] - 1
        enc = _count_layers(state, "transformer.encoder.layers.")
        dec = _count_layers(state, "transformer.decoder.layers.")
        ffn = state["transformer.decoder.layers.0.linear1.weight"].shape[0]
    except KeyError as e:
        raise QDetrError(f"not a DETR checkpoint (no {e.args[0]})", path) from None
    return DetrConfig(backbone=_infer_backbone(state), hidden_dim=hidden, nheads=_guess_heads(hidden),
                      enc_layers=enc, dec_layers=dec, dim_feedforward=ffn, num_queries=num_queries,
                      num_classes=num_classes, dropout=0.1 if hidden >= 256 else 0.0)


def _count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _infer_backbone(state: dict[str, torch.Tensor]) -> str:
    body = "backbone.0.body."
    if f"{body}layer1.0.conv1.weight" not in state:
        return "tiny"
    blocks3 = _count_layers(state, f"{body}layer3.")
    bottleneck = f"{body}layer1.0.conv3.weight" in state
    if bottleneck:
        return "resnet101" if blocks3 == 23 else "resnet50"
    return "resnet34" if blocks3 == 6 else "resnet18"


def _guess_heads(hidden: int) -> int:
    """Upstream stores no head count: DETR uses 8 heads at 256; otherwise head_dim 32."""
    return 8 if hidden == 256 else max(1, hidden // 32)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__
