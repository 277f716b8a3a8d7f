"""TensorRT plugins of the 4-bit kernels: ``qdetr::W4A8Linear`` (quantize the float input per tensor, int4
weights, int8 MMA, the ``gemm_w4a8`` epilogue), and the ONNX rewrite that puts it into an exported graph.

Forms, chosen by what the installed TensorRT offers (:func:`plugin_support`):

- ``"qdp-aot"`` / ``"qdp"``: ``tensorrt.plugin`` (TensorRT 10.6+), with the ahead-of-time Triton kernel
  where ``tensorrt.plugin.aot_impl`` exists (``qdp.py``, ``fused.py``);
- ``"v3"``: Python ``IPluginV3`` classes for TensorRT 10.3 (JetPack 6) (``v3.py``).

:func:`register_plugins` registers one of them (once per process) and returns which; the build and the
run of a 4-bit engine both need it (``qdetr_deploy.engines.tensorrt`` calls it). ``tensorrt`` is imported
only inside these functions; without it they raise a one-line error ("TensorRT is not installed").
The ONNX rewrite (``onnx_rewrite.py``) is pure onnx and needs no TensorRT.
"""

from __future__ import annotations

from typing import Any

from kernels.trt_plugins.onnx_rewrite import (
    DOMAIN,
    OP_TYPE,
    RewriteReport,
    rewrite_file,
    rewrite_int4_linears,
)

__all__ = ["DOMAIN", "NOT_INSTALLED", "OP_TYPE", "RewriteReport", "plugin_support", "register_plugins",
           "rewrite_file", "rewrite_int4_linears"]

NOT_INSTALLED = "TensorRT is not installed"
_registered: dict[str, Any] = {}  # form -> what must stay alive (the V3 creator)


def _error(message: str) -> Exception:
    """QDetrError when qdetr_deploy is importable (it is, in this project), else RuntimeError."""
    try:
        from qdetr_deploy.errors import QDetrError
    except ImportError:
        return RuntimeError(message)
    return QDetrError(message)


def plugin_support() -> tuple[str | None, str]:
    """``(form, reason)``: the plugin form the installed TensorRT supports, or None and why not."""
    try:
        import tensorrt as trt
    except ImportError:
        return None, NOT_INSTALLED
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        trtp = None
    if trtp is not None and hasattr(trtp, "register"):
        aot = hasattr(trtp, "aot_impl")
        return ("qdp-aot" if aot else "qdp"), f"TensorRT {trt.__version__}: tensorrt.plugin"
    if hasattr(trt, "IPluginV3") and hasattr(trt, "IPluginCreatorV3One"):
        return "v3", f"TensorRT {trt.__version__}: Python IPluginV3"
    return None, f"TensorRT {trt.__version__} has neither tensorrt.plugin nor Python IPluginV3 (need 10.3+)"


def register_plugins() -> str:
    """Register ``qdetr::W4A8Linear`` with the installed TensorRT (idempotent); returns the form used."""
    if _registered:
        return next(iter(_registered))
    form, reason = plugin_support()
    if form is None:
        raise _error(f"4-bit TensorRT plugins unavailable: {reason}")
    import tensorrt as trt

    if form.startswith("qdp"):
        import tensorrt.plugin as trtp

        from kernels.trt_plugins.qdp import register_qdp

        register_qdp(trt, trtp, aot=form == "qdp-aot")
        _registered[form] = None
    else:
        from kernels.trt_plugins.v3 import register_v3

        _registered[form] = register_v3(trt)
    return form
