#!/usr/bin/env bash
# Deploy a Q-DETR student on a Jetson Orin (JetPack 6 = TensorRT 10.3, or JetPack 7 = TensorRT 10.16+).
# On the workstation: export once; on the Orin: build the engines there (engines are tied to the TensorRT
# version and the GPU: the header check refuses a plan built elsewhere) and benchmark them.
#
#   usage: examples/jetson_deploy.sh STUDENT.safetensors VAL_IMAGES VAL_ANN.json [H W]
#
# Install on the Orin (once; README "Deploying on Jetson"): JetPack's TensorRT is system-wide, so the venv
# sees it through --system-site-packages (PyPI's tensorrt does not install on Tegra, and the [tensorrt]
# extra does not pull it on aarch64):
#   python3 -m venv --system-site-packages ~/qdetr && . ~/qdetr/bin/activate
#   python3 -c "import tensorrt; print(tensorrt.__version__)"   # 10.3 or newer, else build-engine refuses
#   pip install <the Jetson torch wheel for your JetPack>  # for --bits 4 and --backend torch (CUDA torch);
#                                                          # --bits 8 needs no torch: cuda-python reads the GPU
#   pip install -e '.[tensorrt,gpu]'    # cuda-python (JetPack 6: pip install 'cuda-python>=12,<13'), Triton
set -euo pipefail
CKPT=$1 IMAGES=$2 ANN=$3 H=${4:-800} W=${5:-1216}
TRT_VERSION=${TRT_VERSION:-10.3}   # the Orin's TensorRT: 10.3 on JetPack 6

# --- on the workstation (or on the Orin itself) ---
# --target tensorrt writes only what TensorRT $TRT_VERSION takes: INT8 weights for every conv and every layer
# with quantized inputs (4-bit codes held exactly in INT8), zero-point-0 per-tensor INT8 activation Q/DQ
# (asymmetric sub-8-bit quantizers become an exact clip + INT8 Q/DQ), the opset that TensorRT documents (20 on
# 10.3). --check runs the parity check and the TensorRT lint for that version and the Orin's sm_87 (INT4
# placement, block quantization, FP8, opset, operators, zero points, scales). A student quantized with
# `qdetr-deploy quantize ... --zero-points zero` exports with no float fake-quant fallback (--strict-trt
# insists on that).
qdetr-deploy export "$CKPT" -o qdetr_trt.onnx --target tensorrt --trt-version "$TRT_VERSION" --trt-sm 8.7 \
    --image-size "$H" "$W" --check

# --- on the Orin ---
# int8 container: every sub-8-bit layer runs exactly on TensorRT's INT8 kernels (any INT4 initializer of an
# older export is turned into INT8 exactly, or refused in one line). The graph is linted for the installed
# TensorRT and GPU before parsing.
qdetr-deploy build-engine qdetr_trt.onnx -o qdetr_int8.engine --backend tensorrt --bits 8 \
    --timing-cache orin.timing.cache
# 4-bit linears on our plugins (Python IPluginV3 on 10.3, whose enqueue runs Triton: needs CUDA torch and
# Triton; on 10.9+ the tensorrt.plugin AOT kernel, selected by the node attribute aot=1)
qdetr-deploy build-engine qdetr_trt.onnx -o qdetr_w4.engine --backend tensorrt --bits 4 \
    --timing-cache orin.timing.cache
# our own GPU engine on the int4 kernels (Ampere/Orin: native int4 mma), CUDA graphs
qdetr-deploy build-engine "$CKPT" -o qdetr_w4.qdtorch --backend torch --bits 4

qdetr-deploy bench qdetr_int8.engine qdetr_w4.engine qdetr_w4.qdtorch --images "$IMAGES" --ann "$ANN" \
    --report reports/orin
