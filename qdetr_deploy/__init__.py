"""qdetr-deploy: low-bit quantized detection transformers from QAT checkpoint to verified deployment."""

__version__ = "0.1.0"
