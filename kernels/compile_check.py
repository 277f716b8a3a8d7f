"""Compile every kernel for real GPUs on a machine without one (CI): Triton ahead of time, CUDA with nvcc.

``python -m kernels.compile_check [--json]`` compiles each Triton kernel to PTX and cubin for sm_90
(Hopper: ``wgmma``) and sm_87 (Jetson Orin: ``mma.sync``) and reports, per kernel, whether it uses int8
tensor-core MMA, correctly rounded division (``div.rn.f32``) and no contracted FMA (``fma.rn.f32``):
the facts the bit-exactness of the GPU results rests on. It must run in a process where
``TRITON_INTERPRET`` is unset (the interpreter replaces ``@triton.jit`` functions when they are defined).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["CUDA_SOURCE", "compile_triton_kernels", "nvcc_compile"]

CUDA_SOURCE = Path(__file__).parent / "cuda" / "gemm_s4_mma.cu"
_I32 = "i32"


# Launch-time specialisation of a real call (contiguous operands, DETR-sized dims): unit strides become
# constants and pointers / sizes are multiples of 16, which is what lets Triton vectorise and pipeline.
_UNIT = {"stride_ak": 1, "stride_bk": 1, "stride_on": 1, "stride_xc": 1}
_DIV16 = {
    "M",
    "N",
    "K",
    "KB",
    "C",
    "stride_am",
    "stride_bn",
    "stride_om",
    "stride_xb",
    "stride_xh",
    "stride_xw",
}


def _gemm_signature(out: str) -> dict[str, str]:
    names = (
        "a_ptr b_ptr out_ptr zcorr_ptr wstep_ptr bias_ptr M N K KB stride_am stride_ak stride_bn "
        "stride_bk stride_om stride_on x_step q_step q_zp q_min q_max"
    ).split()
    types = ["*i8", "*u8", out, "*i32", "*fp32", "*fp32"] + [_I32] * 10 + ["fp32", "fp32", _I32, _I32, _I32]
    return dict(zip(names, types))


def _conv_signature(out: str) -> dict[str, str]:
    names = (
        "x_ptr b_ptr out_ptr zcorr_ptr wstep_ptr bias_ptr M N K KB H W C HO WO stride_xb stride_xh "
        "stride_xw stride_xc stride_bn stride_bk stride_om stride_on x_step x_zp q_step q_zp q_min q_max "
        "KW CONV_STRIDE PAD"
    ).split()
    types = (
        ["*i8", "*u8", out, "*i32", "*fp32", "*fp32"]
        + [_I32] * 17
        + ["fp32", _I32, "fp32", _I32, _I32, _I32, _I32, _I32, _I32]
    )
    return dict(zip(names, types))


def _variants() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    from kernels import conv_int4, gemm_w4a8, quantize_act

    tile = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}
    q_sig = {
        "x_ptr": "*fp16",
        "q_ptr": "*i8",
        "numel": _I32,
        "step": "fp32",
        "zero_point": _I32,
        "qmin": _I32,
        "qmax": _I32,
    }
    return [
        ("quantize_act", quantize_act._quantize_act_kernel, q_sig, {"BLOCK": 1024}),
        (
            "w4a8_gemm_fp16_out",
            gemm_w4a8._w4_gemm_kernel,
            _gemm_signature("*fp16"),
            {"A_INT4": False, "A_SIGNED": True, "HAS_BIAS": True, "OUT_MODE": 0, **tile},
        ),
        (
            "w4a8_gemm_quant_out",
            gemm_w4a8._w4_gemm_kernel,
            _gemm_signature("*i8"),
            {"A_INT4": False, "A_SIGNED": True, "HAS_BIAS": True, "OUT_MODE": 2, **tile},
        ),
        (
            "w4a4_gemm_u4_fp32_out",
            gemm_w4a8._w4_gemm_kernel,
            _gemm_signature("*fp32"),
            {"A_INT4": True, "A_SIGNED": False, "HAS_BIAS": False, "OUT_MODE": 0, **tile},
        ),
        (
            "w4_conv_fp16_out",
            conv_int4._w4_conv_kernel,
            _conv_signature("*fp16"),
            {"HAS_BIAS": True, "OUT_MODE": 0, **tile},
        ),
        (
            "w4_conv_quant_out",
            conv_int4._w4_conv_kernel,
            _conv_signature("*i8"),
            {"HAS_BIAS": False, "OUT_MODE": 2, **tile},
        ),
    ]


def _source(fn: object, sig: dict[str, str], consts: dict[str, object]) -> object:
    from triton.compiler import ASTSource

    consts = {**consts, **{k: v for k, v in _UNIT.items() if k in sig}}
    names = list(sig)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n not in consts and (sig[n].startswith("*") or n in _DIV16)
    }
    return ASTSource(fn, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, attrs)


def compile_triton_kernels(capabilities: tuple[int, ...] = (90, 87)) -> dict[str, dict[str, object]]:
    """Compile every kernel variant for each compute capability; returns ``{"name@smXX": facts}``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget

    report: dict[str, dict[str, object]] = {}
    for name, fn, sig, consts in _variants():
        src = _source(fn, sig, consts)
        for cap in capabilities:
            options = {
                "num_warps": 4 if name == "quantize_act" else 8,
                "num_stages": 3,
                "enable_fp_fusion": False,
            }
            kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
            ptx = kernel.asm["ptx"]
            mma = sorted(set(re.findall(r"(?:wgmma\.mma_async\.sync|mma\.sync)\.aligned\.[\w.]+", ptx)))
            report[f"{name}@sm{cap}"] = {
                "mma": mma,
                "int8_mma": any(".s8.s8" in m for m in mma),
                "pipelined": "async_copy_global_to_local" in kernel.asm["ttgir"],
                "div_rn": "div.rn.f32" in ptx,
                "fma_f32": "fma.rn.f32" in ptx,
                "shared_bytes": kernel.metadata.shared,
                "cubin_bytes": len(kernel.asm["cubin"]),
            }
    return report


def nvcc_compile(arch: str, out: Path, with_torch: bool = False, nvcc: str | None = None) -> Path:
    """``nvcc -c`` the CUDA source for ``arch`` (e.g. ``"sm_87"``) into ``out``; returns the object path.

    ``with_torch=False`` compiles the kernel alone (``-DQDETR_NO_TORCH``, seconds); True adds the PyTorch
    dispatcher binding (torch headers, about 20 s).
    """
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    cmd = [nvcc, "-c", f"-arch={arch}", "-O3", "-o", str(out), str(CUDA_SOURCE)]
    if with_torch:
        import torch
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

        std = (
            "-std=c++20"
            if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10)
            else "-std=c++17"
        )
        cmd += [std, *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in include_paths())]
    else:
        cmd += ["-std=c++17", "-DQDETR_NO_TORCH"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return out


def main() -> None:
    """CLI: print the Triton compile report (``--json`` for machine-readable output)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = compile_triton_kernels()
    if args.json:
        print(json.dumps(report))
        return
    for name, facts in report.items():
        print(f"{name:32s} {facts}")


if __name__ == "__main__":
    main()
