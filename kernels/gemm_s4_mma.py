"""W4A4 GEMM on native int4 tensor cores (``mma.sync ... m16n8k64 ... s4``), sm_80 / sm_86 / sm_87.

The kernel is ``kernels/cuda/gemm_s4_mma.cu``, built on first use with
``torch.utils.cpp_extension.load`` (minutes on a Jetson; cached afterwards in the torch extensions
folder) and registered as ``torch.ops.qdetr_mma.w4a4_gemm``. Operands, outputs and the epilogue are those
of :func:`kernels.gemm_w4a8.w4a4_linear`, whose reference :func:`kernels.gemm_w4a8.w4a4_linear_ref` it
matches bit for bit. Hopper (sm_90) has no native int4 MMA: ptxas emulates it with int8 IMMA, so
``allow_emulated=True`` runs the kernel there for correctness checks only; use the Triton kernels for speed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kernels.gemm_w4a8 import OUT_ACC, OUT_QUANT, epilogue_args, out_kind
from kernels.packing import packed_len
from kernels.quantize_act import ActQuant

__all__ = ["SOURCE", "is_available", "load_extension", "unavailable_reason", "w4a4_linear_mma"]

SOURCE = Path(__file__).parent / "cuda" / "gemm_s4_mma.cu"
_CUDA_MODE = {torch.float32: 0, torch.float16: 1}
_LOADED = False


def unavailable_reason(allow_emulated: bool = False) -> str | None:
    """Why the kernel cannot run here (None when it can): it needs CUDA and compute capability 8.x.

    ``allow_emulated`` also accepts sm_9x, where the int4 MMA is emulated (for correctness checks only).
    """
    if not torch.cuda.is_available():
        return "needs CUDA (no GPU on this machine)"
    major, minor = torch.cuda.get_device_capability()
    if major == 8 or (allow_emulated and major == 9):
        return None
    return f"needs compute capability 8.x for native int4 mma.sync, this GPU is sm_{major}{minor}"


def is_available(allow_emulated: bool = False) -> bool:
    """True when CUDA is present and the current GPU is compute capability 8.x (or 9.x if emulated is ok)."""
    return unavailable_reason(allow_emulated) is None


def load_extension(allow_emulated: bool = False, verbose: bool = False) -> None:
    """Compile (first call) and load the extension for the current GPU's architecture."""
    global _LOADED
    reason = unavailable_reason(allow_emulated)
    if reason is not None:
        raise RuntimeError(f"gemm_s4_mma: {reason}")
    if _LOADED:
        return
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    load(
        name=f"qdetr_gemm_s4_mma_sm{major}{minor}",
        sources=[str(SOURCE)],
        is_python_module=False,  # registers torch.ops.qdetr_mma.w4a4_gemm (once per process)
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
        verbose=verbose,
    )
    _LOADED = True


def w4a4_linear_mma(
    x_packed: Tensor,
    act_signed: bool,
    w_packed: Tensor,
    k: int,
    w_step: Tensor,
    zcorr: Tensor,
    x_step: float,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_quant: ActQuant | None = None,
    return_acc: bool = False,
    allow_emulated: bool = False,
) -> Tensor:
    """CUDA W4A4 linear, same contract as :func:`kernels.gemm_w4a8.w4a4_linear` (float32/float16 out).

    ``allow_emulated`` runs on sm_9x too (emulated int4 MMA: for checking the kernel, not for speed).
    """
    if x_packed.dtype != torch.uint8 or x_packed.shape[-1] != packed_len(k):
        raise ValueError(
            f"x_packed must be uint8 [..., {packed_len(k)}], got {x_packed.dtype} {tuple(x_packed.shape)}"
        )
    mode, dtype = out_kind(out_dtype, out_quant, return_acc)
    cuda_mode = {OUT_ACC: 2, OUT_QUANT: 3}.get(mode, _CUDA_MODE.get(dtype))
    if cuda_mode is None:
        raise TypeError(f"the CUDA kernel writes float32 or float16, not {dtype}")
    load_extension(allow_emulated)
    n = w_packed.shape[0]
    ws, zc, _ = epilogue_args(n, w_step, zcorr, bias)
    q = out_quant or ActQuant(1.0, 0, -128, 127)
    lead = x_packed.shape[:-1]
    out = torch.ops.qdetr_mma.w4a4_gemm(
        x_packed.reshape(-1, packed_len(k)),
        w_packed,
        act_signed,
        ws,
        zc,
        float(x_step),
        None if bias is None else bias.to(torch.float32),
        cuda_mode,
        float(q.step),
        int(q.zero_point),
        int(q.qmin),
        int(q.qmax),
    )
    return out.reshape(*lead, n)
