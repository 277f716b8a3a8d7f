"""TensorRT plugins of the 4-bit kernels: ``qdetr::W4A8Linear`` (quantize the float input per tensor, int4
weights, int8 MMA, the ``gemm_w4a8`` epilogue), and the ONNX rewrite that puts it into an exported graph.

Forms, chosen by what the installed TensorRT offers (:func:`plugin_support`; by version number:
:func:`plugin_form_for`):

- ``"qdp-aot"`` / ``"qdp"``: ``tensorrt.plugin`` (TensorRT 10.6+), with the ahead-of-time Triton kernel
  where ``tensorrt.plugin.aot_impl`` exists (10.9+; the rewritten nodes then carry ``aot=1``,
  :func:`aot_attribute`) (``qdp.py``, ``fused.py``);
- ``"v3"``: Python ``IPluginV3`` classes for TensorRT 10.3 (JetPack 6) (``v3.py``).

:func:`register_plugins` registers one of them (once per process) and returns which; the build and the
run of a 4-bit engine both need it (``qdetr_deploy.engines.tensorrt`` calls it). ``tensorrt`` is imported
only inside these functions; without it they raise a one-line :class:`~kernels.errors.KernelError`
("TensorRT is not installed"), which ``qdetr_deploy.engines.tensorrt`` translates to ``QDetrError``.
The ONNX rewrite (``onnx_rewrite.py``) is pure onnx and needs no TensorRT.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from kernels.errors import KernelError
from kernels.trt_plugins.onnx_rewrite import (
    DOMAIN,
    OP_TYPE,
    RewriteReport,
    aot_attribute,
    plugin_form_for,
    rewrite_file,
    rewrite_int4_linears,
)

__all__ = ["DOMAIN", "KernelError", "NOT_INSTALLED", "OP_TYPE", "RewriteReport", "aot_attribute",
           "plugin_form_for", "plugin_support", "register_plugins", "rewrite_file", "rewrite_int4_linears",
           "triton_problem"]

NOT_INSTALLED = "TensorRT is not installed"
MIN_TRITON = (3, 0)
_registered: dict[str, Any] = {}  # form -> what must stay alive (the V3 creator)


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


def triton_problem() -> str | None:
    """Why Triton cannot serve the plugins here (not installed, older than 3.0), or None. Every form needs
    it: "v3" and "qdp" run the Triton kernels inside ``enqueue`` (a missing Triton would fail there, in the
    middle of a build's tactic timing or an inference), and "qdp-aot" compiles its kernel with it."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (the 4-bit plugins run Triton kernels: pip install 'triton>=3.0')"
    import triton

    parts = [int(p) if p.isdigit() else 0 for p in triton.__version__.split(".")[:2]]
    if tuple(parts) < MIN_TRITON:
        return f"Triton {triton.__version__} is too old for the 4-bit plugins (need 3.0+)"
    return None


def register_plugins() -> str:
    """Register ``qdetr::W4A8Linear`` with the installed TensorRT (idempotent); returns the form used.
    Triton is checked first (:func:`triton_problem`): a form that runs Triton inside ``enqueue`` is never
    registered without it."""
    if _registered:
        return next(iter(_registered))
    form, reason = plugin_support()
    if form is None:
        raise KernelError(f"4-bit TensorRT plugins unavailable: {reason}")
    problem = triton_problem()
    if problem is not None:
        raise KernelError(f"4-bit TensorRT plugins unavailable: {problem}")
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
