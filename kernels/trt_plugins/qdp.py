"""``qdetr::W4A8Linear`` as a ``tensorrt.plugin`` quickly deployable plugin (TensorRT 10.6+; AOT: 10.9+).

- ``@trtp.register``: output ``[..., N]`` in x's dtype, plus two one-element int32 scratch outputs (the
  pointers Triton's hidden kernel parameters receive in the AOT form, see ``fused.py``);
- ``@trtp.impl`` (JIT): TensorRT calls back into Python, which runs the tested Triton kernels on its stream
  (``runner.w4a8_forward``);
- ``@trtp.aot_impl`` (where ``tensorrt.plugin`` has it): the fused kernel of ``fused.py`` compiled to PTX for
  the build GPU and embedded in the engine, so the engine runs without Python. An ONNX node picks it with
  the attribute ``aot=1`` (``onnx_rewrite.rewrite_int4_linears(aot=True)``).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations as classes.

Attributes are ``numpy.typing.NDArray[dtype]`` (:data:`ATTR_TYPES`), as ``tensorrt.plugin.register``
documents ("1-D Numpy arrays ... must be annotated with 'numpy.typing.NDArray[dtype]'"): its creator
converts a builtin-annotated attribute with ``annotation(field.data)`` on a one-element array
(``_lib.py``, release/10.16), ``int(np.array([5]))``, which NumPy 2.x refuses; an array annotation gets
``field.data.astype(dtype)``. The functions read element 0 (:func:`attrs_of`).
"""

import numpy as np
import numpy.typing as npt
import torch

from kernels.trt_plugins.fused import AOT_TILE, HIDDEN_OUTPUTS, compile_w4a8_fused, float_bits
from kernels.trt_plugins.runner import PluginAttrs, run_on_stream, w4a8_forward

PLUGIN_ID = "qdetr::W4A8Linear"
I32 = npt.NDArray[np.int32]
F32 = npt.NDArray[np.float32]
#: the plugin attributes and their annotations (onnx_rewrite writes them as ONNX INT / FLOAT attributes)
ATTR_TYPES = {"k": I32, "x_step": F32, "x_zero_point": I32, "qmin": I32, "qmax": I32}


def attrs_of(k: I32, x_step: F32, x_zero_point: I32, qmin: I32, qmax: I32) -> PluginAttrs:
    """PluginAttrs from the one-element attribute arrays tensorrt.plugin passes."""
    def first(a) -> np.generic:  # noqa: ANN001
        return np.asarray(a).reshape(-1)[0]

    return PluginAttrs(int(first(k)), float(np.float32(first(x_step))), int(first(x_zero_point)),
                       int(first(qmin)), int(first(qmax)))


def register_qdp(trt, trtp, aot: bool) -> None:  # noqa: ANN001
    """Register the descriptor and the JIT implementation, and the AOT one when ``aot``."""

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, w_packed: trtp.TensorDesc, w_step: trtp.TensorDesc, zcorr: trtp.TensorDesc,
              bias: trtp.TensorDesc, k: I32, x_step: F32, x_zero_point: I32, qmin: I32, qmax: I32,
              ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        out = trtp.from_shape_expr(tuple(list(x.shape_expr)[:-1]) + (w_packed.shape_expr[0],), dtype=x.dtype)
        scratch = [trtp.from_shape_expr((1,), dtype=trt.int32) for _ in range(HIDDEN_OUTPUTS)]
        return (out, *scratch)

    @trtp.impl(PLUGIN_ID)
    def _impl(x: trtp.Tensor, w_packed: trtp.Tensor, w_step: trtp.Tensor, zcorr: trtp.Tensor,
              bias: trtp.Tensor, k: I32, x_step: F32, x_zero_point: I32, qmin: I32, qmax: I32,
              outputs: tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor], stream: int) -> None:
        # trtp.Tensor has __cuda_array_interface__: torch wraps TensorRT's memory without a copy
        tensors = [torch.as_tensor(t, device="cuda") for t in (x, w_packed, w_step, zcorr, bias, outputs[0])]
        attrs = attrs_of(k, x_step, x_zero_point, qmin, qmax)
        run_on_stream(stream, w4a8_forward, *tensors[:5], attrs, tensors[5])

    if aot:
        _register_aot(trt, trtp)


def _register_aot(trt, trtp) -> None:  # noqa: ANN001
    @trtp.aot_impl(PLUGIN_ID)
    def _aot(x: trtp.TensorDesc, w_packed: trtp.TensorDesc, w_step: trtp.TensorDesc, zcorr: trtp.TensorDesc,
             bias: trtp.TensorDesc, k: I32, x_step: F32, x_zero_point: I32, qmin: I32, qmax: I32,
             outputs: tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], tactic: int,
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        a = attrs_of(k, x_step, x_zero_point, qmin, qmax)
        float_type = "fp16" if x.dtype == trt.float16 else "fp32"
        major, minor = torch.cuda.get_device_capability()
        kernel = compile_w4a8_fused(float_type, major * 10 + minor)
        if any(getattr(kernel.metadata, f"{s}_scratch_size", 0) for s in ("global", "profile")):
            raise RuntimeError("the fused W4A8 kernel needs Triton scratch memory; the AOT plugin has none")
        n = w_packed.shape_expr[0]
        m = x.shape_expr.numel() // a.k
        words = w_packed.shape_expr[1]
        scalars = [m, n, a.k, (a.k + 1) // 2, words * 4, float_bits(a.x_step), a.x_zero_point, a.qmin, a.qmax]
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(m, AOT_TILE["BLOCK_M"]) * trtp.cdiv(n, AOT_TILE["BLOCK_N"])
        params.block_x = kernel.metadata.num_warps * 32
        params.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, extra
