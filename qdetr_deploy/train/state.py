"""Seeding, every generator's state as plain tensors, and reading a run's state back for ``--resume``.

The state file (``train_state.pt``) holds plain tensors and containers only, so ``torch.load(weights_only=
True)`` reads it; a resumed run continues bit for bit (the sampler skips what the epoch consumed and
augmentation is seeded per sample: ``distributed.SeededDataset``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdetr_deploy.errors import QDetrError
from qdetr_deploy.train.config import STATE_FORMAT, STATE_NAME, TrainConfig


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's generator states as plain containers and tensors (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_resume_state(config: TrainConfig) -> dict[str, Any] | None:
    """The saved state of ``output_dir`` when resuming; refuses to overwrite a run without ``resume``."""
    path = Path(config.output_dir) / STATE_NAME
    if not path.is_file():
        return None
    if not config.resume:
        raise QDetrError("the output folder already holds a training run: pass --resume to continue it or "
                         "choose another --output-dir", config.output_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is one user-facing error
        raise QDetrError(f"unreadable training state ({type(e).__name__}: {e})", path) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise QDetrError(f"not a training state file (format {STATE_FORMAT} expected)", path)
    return state


def resume_model(ckpt: Any, state: dict[str, Any]) -> nn.Module:
    """The model at the training state's step.

    A save writes the checkpoint, then the training state (which carries its own copy of the weights). A run
    killed between the two leaves a checkpoint one save ahead: the state's weights win, so the run resumes
    exactly from the state's step.
    """
    from qdetr_deploy.checkpoints import load_state

    if ckpt.meta.get("step") == state["step"]:
        return ckpt.model
    if "model" not in state:
        raise QDetrError(f"checkpoint is at step {ckpt.meta.get('step')} but {STATE_NAME} at step "
                         f"{state['step']} (a save was interrupted): cannot resume exactly", ckpt.path)
    load_state(ckpt.model, state["model"], ckpt.path)
    return ckpt.model
