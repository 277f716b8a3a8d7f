"""``qdetr::W4A8Linear`` as a ``tensorrt.plugin`` quickly deployable plugin (TensorRT 10.6+; AOT: 10.9+).

- ``@trtp.register``: output ``[..., N]`` in x's dtype, plus two one-element int32 scratch outputs (the
  pointers Triton's hidden kernel parameters receive in the AOT form, see ``fused.py``);
- ``@trtp.impl`` (JIT): TensorRT calls back into Python, which runs the tested Triton kernels on its stream
  (``runner.w4a8_forward``);
- ``@trtp.aot_impl`` (where ``tensorrt.plugin`` has it): the fused kernel of ``fused.py`` compiled to PTX for
  the build GPU and embedded in the engine, so the engine runs without Python. An ONNX node picks it with
  the attribute ``aot=1`` (``onnx_rewrite.rewrite_int4_linears(aot=True)``).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations as classes.
"""

import torch

from kernels.trt_plugins.fused import AOT_TILE, HIDDEN_OUTPUTS, compile_w4a8_fused, float_bits
from kernels.trt_plugins.runner import PluginAttrs, run_on_stream, w4a8_forward

PLUGIN_ID = "qdetr::W4A8Linear"


def register_qdp(trt, trtp, aot: bool) -> None:  # noqa: ANN001
    """Register the descriptor and the JIT implementation, and the AOT one when ``aot``."""

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, w_packed: trtp.TensorDesc, w_step: trtp.TensorDesc, zcorr: trtp.TensorDesc,
              bias: trtp.TensorDesc, k: int, x_step: float, x_zero_point: int, qmin: int, qmax: int,
              ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        out = trtp.from_shape_expr(tuple(list(x.shape_expr)[:-1]) + (w_packed.shape_expr[0],), dtype=x.dtype)
        scratch = [trtp.from_shape_expr((1,), dtype=trt.int32) for _ in range(HIDDEN_OUTPUTS)]
        return (out, *scratch)

    @trtp.impl(PLUGIN_ID)
    def _impl(x: trtp.Tensor, w_packed: trtp.Tensor, w_step: trtp.Tensor, zcorr: trtp.Tensor,
              bias: trtp.Tensor, k: int, x_step: float, x_zero_point: int, qmin: int, qmax: int,
              outputs: tuple[trtp.Tensor, trtp.Tensor, trtp.Tensor], stream: int) -> None:
        # trtp.Tensor has __cuda_array_interface__: torch wraps TensorRT's memory without a copy
        tensors = [torch.as_tensor(t, device="cuda") for t in (x, w_packed, w_step, zcorr, bias, outputs[0])]
        attrs = PluginAttrs(k, x_step, x_zero_point, qmin, qmax)
        run_on_stream(stream, w4a8_forward, *tensors[:5], attrs, tensors[5])

    if aot:
        _register_aot(trt, trtp)


def _register_aot(trt, trtp) -> None:  # noqa: ANN001
    @trtp.aot_impl(PLUGIN_ID)
    def _aot(x: trtp.TensorDesc, w_packed: trtp.TensorDesc, w_step: trtp.TensorDesc, zcorr: trtp.TensorDesc,
             bias: trtp.TensorDesc, k: int, x_step: float, x_zero_point: int, qmin: int, qmax: int,
             outputs: tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], tactic: int,
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        float_type = "fp16" if x.dtype == trt.float16 else "fp32"
        major, minor = torch.cuda.get_device_capability()
        kernel = compile_w4a8_fused(float_type, major * 10 + minor)
        if any(getattr(kernel.metadata, f"{s}_scratch_size", 0) for s in ("global", "profile")):
            raise RuntimeError("the fused W4A8 kernel needs Triton scratch memory; the AOT plugin has none")
        n = w_packed.shape_expr[0]
        m = x.shape_expr.numel() // k
        words = w_packed.shape_expr[1]
        scalars = [m, n, k, (k + 1) // 2, words * 4, float_bits(x_step), x_zero_point, qmin, qmax]
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(m, AOT_TILE["BLOCK_M"]) * trtp.cdiv(n, AOT_TILE["BLOCK_N"])
        params.block_x = kernel.metadata.num_warps * 32
        params.shared_mem = kernel.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), params, extra
