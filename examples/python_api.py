"""Quantize, distill and export with the Python API (the same functions the CLI wraps).

Run from the repository root after `qdetr-deploy make-dataset shapes --out data/shapes` and a teacher from
`qdetr-deploy train` (or `qdetr-deploy demo`, which makes both under qdetr_demo/).
"""

from qdetr_deploy.checkpoints import load_checkpoint
from qdetr_deploy.export.check import check_onnx
from qdetr_deploy.export.onnx_export import export_onnx
from qdetr_deploy.pipeline import quantize_checkpoint
from qdetr_deploy.train.distill import DistillConfig, distill
from qdetr_deploy.train.loop import TrainConfig

TEACHER, DATA = "qdetr_demo/teacher/checkpoint.safetensors", "qdetr_demo/data"

# 1. 4-4-8 student, steps initialised by LSQ+ on 64 calibration images
student = quantize_checkpoint(TEACHER, "student_init.safetensors", bits="4-4-8", calib=f"{DATA}/train",
                              calib_size=64, image_size=(96, 96))
# 2. Q-DETR: L_GT + 2.5 * L_DRD with foreground-aware query matching (tau 0.6), DA in decoder self-attention
config = TrainConfig(images=f"{DATA}/train", ann=f"{DATA}/annotations/train.json", val_images=f"{DATA}/val",
                     val_ann=f"{DATA}/annotations/val.json", output_dir="runs/student", max_steps=200,
                     epochs=None, batch_size=16, image_size=96, scales=(96,), max_size=96, workers=0)
result = distill(str(student), TEACHER, config, DistillConfig(fqm=True, tau=0.6, lambda_drd=2.5))
# 3. ONNX with the learned steps folded into Q/DQ, checked against the PyTorch fake-quant model
onnx_model = export_onnx(result.checkpoint, "student.onnx", image_size=(96, 96))
report = check_onnx(onnx_model.path, load_checkpoint(result.checkpoint).model)
print(f"AP50 {result.metrics['AP50']:.3f}; parity {report.passed} (max box diff {report.max_box_diff:.1e})")
