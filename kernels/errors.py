"""``KernelError``: what the kernels package raises for a request it cannot serve (a missing runtime, an
unsupported TensorRT). The kernels know nothing of qdetr_deploy; its engines translate this error into
their one-line ``QDetrError``."""

from __future__ import annotations


class KernelError(RuntimeError):
    """A kernel or plugin is not available here, or refuses its input; the message is one line."""
