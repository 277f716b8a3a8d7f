#!/usr/bin/env bash
# The Q-DETR ablation on the procedural shapes set (docs/RESULTS.md), end to end on CPUs:
#   1. make the shapes set (1200 train / 200 val images, 96x96, 3 classes);
#   2. train a full-precision detr_tiny teacher;
#   3. train the 4-4-8 student four ways with the same budget, each from the teacher's weights
#      (quantized + calibrated on the first training batches):
#        baseline  LSQ+ only            --no-da --no-fqm
#        da        + DA                 --no-fqm
#        fqm       + FQM/DRD            --no-da
#        both      + DA + FQM/DRD       (Q-DETR)
#   4. write results.md / results.json (AP, AP50 next to the paper's VOC ablation).
#
# Usage: benchmarks/run_ablation.sh [OUT_DIR]          (default runs/ablation)
# Budgets and sizes come from the environment (defaults = the full experiment), e.g. a smoke run:
#   NUM_TRAIN=96 NUM_VAL=32 TEACHER_EPOCHS=2 STUDENT_EPOCHS=1 benchmarks/run_ablation.sh /tmp/ablation-smoke
# Every step passes --resume: rerunning the script after an interruption continues where it stopped, and
# finished runs are not repeated.
set -euo pipefail

OUT=${1:-runs/ablation}
QDETR=${QDETR:-"python -m qdetr_deploy"}
NUM_TRAIN=${NUM_TRAIN:-1200}
NUM_VAL=${NUM_VAL:-200}
IMAGE_SIZE=${IMAGE_SIZE:-96}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-0}
SEED=${SEED:-42}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-36}
TEACHER_LR=${TEACHER_LR:-3e-4}
TEACHER_DROP=${TEACHER_DROP:-30}
TEACHER_EVAL_EVERY=${TEACHER_EVAL_EVERY:-12}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-8}
STUDENT_LR=${STUDENT_LR:-1e-4}
STUDENT_DROP=${STUDENT_DROP:-6}
STUDENT_EVAL_EVERY=${STUDENT_EVAL_EVERY:-4}
DRD_DISTANCE=${DRD_DISTANCE:-mse}
BITS=${BITS:-4-4-8}
VARIANTS=${VARIANTS:-"baseline da fqm both"}

mkdir -p "$OUT"
DATA="$OUT/shapes"
COMMON=(--images "$DATA/train" --ann "$DATA/annotations/train.json"
        --val-images "$DATA/val" --val-ann "$DATA/annotations/val.json"
        --image-size "$IMAGE_SIZE" --max-size "$IMAGE_SIZE" --batch-size "$BATCH" --workers "$WORKERS"
        --seed "$SEED" --clip-max-norm 0.1 --weight-decay 1e-4 --no-progress --resume)

stamp() { date +%s; }
timed() {  # timed NAME CMD...: run CMD, append "NAME seconds" to $OUT/times.txt
  local name=$1; shift
  local t0; t0=$(stamp)
  echo "== $name: $*"
  "$@"
  echo "$name $(( $(stamp) - t0 ))" >> "$OUT/times.txt"
}

: > "$OUT/times.txt"
# shellcheck disable=SC2086  # $QDETR is a command line on purpose
timed dataset $QDETR make-dataset shapes --out "$DATA" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" \
  --image-size "$IMAGE_SIZE" --seed 0

# shellcheck disable=SC2086
timed teacher $QDETR train --arch detr_tiny "${COMMON[@]}" --output-dir "$OUT/teacher" \
  --epochs "$TEACHER_EPOCHS" --lr "$TEACHER_LR" --lr-backbone "$TEACHER_LR" --lr-drop "$TEACHER_DROP" \
  --eval-every "$TEACHER_EVAL_EVERY"

for variant in $VARIANTS; do
  case $variant in
    baseline) flags=(--no-da --no-fqm) ;;
    da) flags=(--no-fqm) ;;
    fqm) flags=(--no-da --drd-distance "$DRD_DISTANCE") ;;
    both) flags=(--drd-distance "$DRD_DISTANCE") ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  timed "$variant" $QDETR distill from-teacher --teacher "$OUT/teacher/checkpoint.safetensors" "${COMMON[@]}" \
    --output-dir "$OUT/$variant" --bits "$BITS" "${flags[@]}" --epochs "$STUDENT_EPOCHS" \
    --lr "$STUDENT_LR" --lr-backbone "$STUDENT_LR" --lr-drop "$STUDENT_DROP" --eval-every "$STUDENT_EVAL_EVERY"
done

python - "$OUT" "$VARIANTS" "$BITS" <<'EOF'
import json
import sys
from pathlib import Path

out, variants, bits = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3]
paper = {"baseline": 78.0, "da": 78.8, "fqm": 81.5, "both": 82.7}  # VOC test2007 AP50, 4-bit DETR-R50
label = {"teacher": "full-precision teacher", "baseline": "LSQ+ baseline (--no-da --no-fqm)",
         "da": "+DA (--no-fqm)", "fqm": "+FQM/DRD (--no-da)", "both": "+DA +FQM/DRD (Q-DETR)"}
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines() if line.strip())


def last_eval(run: str) -> dict:
    evals = [r for r in map(json.loads, (out / run / "log.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    return evals[-1] if evals else {}


rows, result = [], {}
for run in ["teacher", *variants]:
    m = last_eval(run)
    result[run] = {"AP": m.get("AP"), "AP50": m.get("AP50"), "AP75": m.get("AP75"), "epoch": m.get("epoch"),
                   "step": m.get("step"), "seconds": int(times.get(run, 0)), "paper_voc_ap50": paper.get(run)}
    ref = f"{paper[run]:.1f}" if run in paper else ("83.3 (FP)" if run == "teacher" else "")
    fmt = (lambda v: f"{100 * v:.1f}" if v is not None else "n/a")
    rows.append(f"| {label[run]} | {fmt(m.get('AP'))} | {fmt(m.get('AP50'))} | {ref} | "
                f"{result[run]['seconds']} |")
table = "\n".join([f"Student bits {bits}; shapes val set, COCO AP x100.", "",
                   "| run | AP | AP50 | paper VOC AP50 (4-bit) | wall s |", "| --- | --- | --- | --- | --- |",
                   *rows])
(out / "results.md").write_text(table + "\n")
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
print(table)
teacher_ap50 = result["teacher"]["AP50"]
if teacher_ap50 is not None and teacher_ap50 < 0.6:
    print(f"note: the teacher reached AP50 {teacher_ap50:.3f} < 0.6; raise TEACHER_EPOCHS (the students "
          "inherit its weights)")
EOF
