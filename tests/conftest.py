"""Shared fixtures: paths to the real test data beside the project (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter or compiler when a @triton.jit function is defined, i.e. when a kernels module is
# first imported - possibly by a test file collected before the kernel tests. Without a GPU, interpret.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real test data lives in ../shared beside the project)")
    return path
