#!/usr/bin/env bash
# Deploy a Q-DETR student on a Jetson Orin (JetPack 6 = TensorRT 10.3, or JetPack 7 = TensorRT 10.16+).
# On the workstation: export once; on the Orin: build the engine there (engines are tied to the TensorRT
# version and the GPU: the header check refuses a plan built elsewhere) and benchmark it.
#
#   usage: examples/jetson_deploy.sh STUDENT.safetensors VAL_IMAGES VAL_ANN.json [H W]
set -euo pipefail
CKPT=$1 IMAGES=$2 ANN=$3 H=${4:-800} W=${5:-1216}

# --- on the workstation (or on the Orin itself) ---
# TensorRT accepts only zero-point-0, per-tensor INT8 activation Q/DQ: --target tensorrt rewrites the
# asymmetric sub-8-bit quantizers exactly (float clip to the shifted range + INT8 Q/DQ) and --check lints
# the graph statically (zero points, per-channel scales, opset, dtypes, unsupported ops). A student quantized
# with `qdetr-deploy quantize ... --zero-points zero` exports with no float fake-quant fallback at all
# (add --strict-trt to insist on that).
qdetr-deploy export "$CKPT" -o qdetr_trt.onnx --target tensorrt --image-size "$H" "$W" --check

# --- on the Orin (pip install 'qdetr-deploy[tensorrt]'; JetPack ships tensorrt for its Python) ---
# int8 container: every sub-8-bit layer runs exactly on TensorRT's INT8 kernels.
qdetr-deploy build-engine qdetr_trt.onnx -o qdetr_int8.engine --backend tensorrt --bits 8 \
    --timing-cache orin.timing.cache
# 4-bit weights on our plugins (IPluginV3 on TensorRT 10.3; tensorrt.plugin AOT on 10.6+)
qdetr-deploy build-engine qdetr_trt.onnx -o qdetr_w4.engine --backend tensorrt --bits 4 \
    --timing-cache orin.timing.cache
# our own GPU engine on the int4 kernels (Ampere/Orin: native int4 mma), CUDA graphs
qdetr-deploy build-engine "$CKPT" -o qdetr_w4.qdtorch --backend torch --bits 4

qdetr-deploy bench qdetr_int8.engine qdetr_w4.engine qdetr_w4.qdtorch --images "$IMAGES" --ann "$ANN" \
    --report reports/orin
