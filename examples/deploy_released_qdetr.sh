#!/usr/bin/env bash
# Deploy a published Q-DETR checkpoint (the released code's quantized SMCA-DETR, model zoo of
# github.com/Hzbupahaozi/Q-DETR: the 4-bit file, 38.5 AP on COCO, and the 2-bit file, 32.4 AP).
# The files store no bit widths: pass the ones of the model-zoo entry you downloaded (4-4-8 or 2-2-8).
#
#   usage: examples/deploy_released_qdetr.sh RELEASED.pth BITS IMAGES ANN.json [H W] [OUT]
#   e.g.   examples/deploy_released_qdetr.sh qdetr_smca_r50_4bit.pth 4-4-8 coco/val2017 \
#              coco/annotations/instances_val2017.json 800 1216 released_4bit
#
# Without the published file, the released-format fixture that the tests use runs the same commands:
#   examples/deploy_released_qdetr.sh ../shared/data/qdetr_released_fixture/smca_small_4bit.pth 4-4-8 \
#       ../shared/data/coco128/train2017 ../shared/data/coco128/annotations/instances_train2017.json 256 352
set -euo pipefail
CKPT=$1 BITS=$2 IMAGES=$3 ANN=$4 H=${5:-800} W=${6:-1216} OUT=${7:-released_qdetr}
QDETR=${QDETR:-qdetr-deploy}
mkdir -p "$OUT"

# 1. what the file is: "quantized SMCA-DETR, released Q-DETR format, 4-4-8", its size and operations
$QDETR inspect "$CKPT" --bits "$BITS" --input-size "$H" "$W" --no-layers

# 2. ONNX for ONNX Runtime, checked per layer against the PyTorch forward on real images (the default
#    target writes 8-bit weight containers that run on ONNX Runtime's integer kernels; sigmoid top-k
#    post-processing is in the graph)
# shellcheck disable=SC2086  # $QDETR is a command line on purpose
$QDETR export "$CKPT" --bits "$BITS" -o "$OUT/qdetr.onnx" --image-size "$H" "$W" \
    --check --check-images "$IMAGES"

# 3. ONNX for TensorRT: the released activation quantizers have one step and zero point per channel, which
#    TensorRT's Q/DQ cannot take; the export writes the exact float fake-quant for them and lists them
#    (--strict-trt refuses instead)
$QDETR export "$CKPT" --bits "$BITS" -o "$OUT/qdetr_trt.onnx" --image-size "$H" "$W" --target tensorrt \
    --check --check-images "$IMAGES"

# 4. engine and benchmark (latency percentiles, memory, COCO AP; category ids are the model's 92 slots)
$QDETR build-engine "$OUT/qdetr.onnx" -o "$OUT/qdetr.ortengine" --backend onnxruntime
$QDETR bench "$OUT/qdetr.ortengine" --images "$IMAGES" --ann "$ANN" --report "$OUT/report" \
    --warmup 2 --iters 10 --max-images "${MAX_IMAGES:-16}"

# 5. look at the detections
$QDETR predict "$OUT/qdetr.ortengine" "$IMAGES" -o "$OUT/predict" --score-threshold "${SCORE:-0.3}"
