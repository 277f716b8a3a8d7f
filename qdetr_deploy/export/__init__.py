"""Export: folding rules (one function per layer kind), the ONNX builder, the parity check and the TensorRT
lint (docs/ARCHITECTURE.md "ONNX model")."""
