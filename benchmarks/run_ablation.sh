#!/usr/bin/env bash
# The multi-seed Q-DETR ablation on the procedural shapes set (docs/RESULTS.md), end to end on CPUs:
#   1. the shapes set (1200 train / 200 val images, 96x96, 3 classes);
#   2. the teacher: a full-precision detr_tiny trained TEACHER_EPOCHS (lr x0.1 at TEACHER_DROP), seed 7;
#   3. the student's starting point: the same run's snapshot at epoch STUDENT_FP_EPOCHS (before the drop,
#      --keep-every), a weaker model that is *not* the teacher's weights and still has a lot to learn
#      (a separate deeper teacher did not fit the 2 shared cores; see docs/RESULTS.md);
#   4. every cell (BITS:VARIANT) with every seed of SEEDS: the student_fp checkpoint quantized to BITS,
#      calibrated, and trained STUDENT_STEPS steps with the VARIANT's flags (same data, same budget; the seed
#      sets the data order and calibration batches, so cells are paired by seed);
#   5. benchmarks/summarize_ablation.py: results.md / results.json (mean +- std, paired differences against
#      the baseline of the same bits, paired t-test) and ablation.png (AP50 per cell with error bars).
#
# Usage: benchmarks/run_ablation.sh [OUT_DIR]          (default runs/ablation)
# Budgets, sizes and the cell list come from the environment (defaults = the study in docs/RESULTS.md).
# Smoke run:  NUM_TRAIN=48 NUM_VAL=16 STUDENT_FP_EPOCHS=1 TEACHER_EPOCHS=1 STUDENT_STEPS=2 SEEDS=1 \
#               CELLS="4-4-8:baseline 4-4-8:both" benchmarks/run_ablation.sh /tmp/ablation-smoke
# Every training passes --resume and a finished cell leaves a `done` file: rerunning the script after an
# interruption continues where it stopped, and finished runs are not repeated.
set -euo pipefail

OUT=${1:-runs/ablation}
QDETR=${QDETR:-"python -m qdetr_deploy"}
PYTHON=${PYTHON:-python}
NUM_TRAIN=${NUM_TRAIN:-1200}
NUM_VAL=${NUM_VAL:-200}
IMAGE_SIZE=${IMAGE_SIZE:-96}
BATCH=${BATCH:-16}
STUDENT_FP_EPOCHS=${STUDENT_FP_EPOCHS:-16}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-24}
TEACHER_DROP=${TEACHER_DROP:-20}
FP_LR=${FP_LR:-3e-4}
STUDENT_STEPS=${STUDENT_STEPS:-100}
STUDENT_LR=${STUDENT_LR:-2e-4}
SEEDS=${SEEDS:-"1 2 3"}
# priority order: 4-4-8 core and variants, 2-2-8, then the lambda / distance sweep of the best variant
CELLS=${CELLS:-"4-4-8:baseline 4-4-8:da 4-4-8:fqm 4-4-8:both 4-4-8:both_d 4-4-8:both_role 4-4-8:both_tau_none
  2-2-8:baseline 2-2-8:da 2-2-8:both 2-2-8:fqm
  4-4-8:fqm_lam0.5 4-4-8:fqm_lam0.1 4-4-8:fqm_l2 4-4-8:fqm_l2_lam0.5 4-4-8:fqm_l2_lam0.1"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per run: the machine is shared

mkdir -p "$OUT"
DATA="$OUT/shapes"
COMMON=(--images "$DATA/train" --ann "$DATA/annotations/train.json"
        --val-images "$DATA/val" --val-ann "$DATA/annotations/val.json"
        --image-size "$IMAGE_SIZE" --max-size "$IMAGE_SIZE" --batch-size "$BATCH" --workers 0
        --clip-max-norm 0.1 --weight-decay 1e-4 --no-progress --resume)

timed() {  # timed NAME CMD...: run CMD, append "NAME seconds" to $OUT/times.txt
  local name=$1; shift
  local t0=$SECONDS
  echo "== $(date +%T) $name: $*"
  "$@"
  echo "$name $(( SECONDS - t0 ))" >> "$OUT/times.txt"
}

# flags of a variant: base name, then optional _lam<value> / _l2 suffixes (the sweep)
variant_flags() {
  local v=$1 lam="" flags
  if [[ $v =~ _lam([0-9.]+)$ ]]; then lam=${BASH_REMATCH[1]}; v=${v%_lam*}; fi
  local dist=mse
  if [[ $v == *_l2 ]]; then dist=l2; v=${v%_l2}; fi
  case $v in  # every flag explicit, so that the cells do not depend on distill's defaults
    baseline) echo "--no-da --no-fqm"; return ;;
    da) echo "--da self --no-fqm"; return ;;
    fqm) flags="--no-da --fqm" ;;
    both) flags="--da self --fqm" ;;
    both_d) flags="--da self --fqm --drd-feature d" ;;
    both_role) flags="--da self --fqm --fqm-match role" ;;
    both_d_role) flags="--da self --fqm --drd-feature d --fqm-match role" ;;
    both_tau_none) flags="--da self --fqm --tau none" ;;
    *) echo "unknown variant $1" >&2; return 2 ;;
  esac
  echo "$flags --drd-distance $dist${lam:+ --lambda-drd $lam}"
}

[[ -f $DATA/annotations/val.json ]] || timed dataset $QDETR make-dataset shapes --out "$DATA" \
  --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --image-size "$IMAGE_SIZE" --seed 0

# shellcheck disable=SC2086  # $QDETR is a command line on purpose
[[ -f $OUT/teacher/done ]] || { timed teacher $QDETR train --arch detr_tiny "${COMMON[@]}" --seed 7 \
  --output-dir "$OUT/teacher" --epochs "$TEACHER_EPOCHS" --lr "$FP_LR" --lr-backbone "$FP_LR" \
  --lr-drop "$TEACHER_DROP" --eval-every 4 --keep-every "$STUDENT_FP_EPOCHS" && touch "$OUT/teacher/done"; }
START="$OUT/teacher/checkpoint_epoch$(printf %04d "$STUDENT_FP_EPOCHS").safetensors"
mkdir -p "$OUT/student_fp"
if [[ ! -f $OUT/student_fp/checkpoint.safetensors ]]; then
  cp "$START" "$OUT/student_fp/checkpoint.safetensors"
  grep "\"event\": \"eval\", \"epoch\": $STUDENT_FP_EPOCHS," "$OUT/teacher/log.jsonl" > "$OUT/student_fp/log.jsonl"
fi

for cell in $CELLS; do
  bits=${cell%%:*}; variant=${cell#*:}
  flags=$(variant_flags "$variant")
  for seed in $SEEDS; do
    run="$OUT/cells/$bits/$variant/seed$seed"
    [[ -f $run/done ]] && continue
    # shellcheck disable=SC2086  # $flags is a list of options
    timed "$bits/$variant/seed$seed" $QDETR distill "$OUT/student_fp/checkpoint.safetensors" \
      --teacher "$OUT/teacher/checkpoint.safetensors" "${COMMON[@]}" --seed "$seed" --output-dir "$run" \
      --bits "$bits" $flags --max-steps "$STUDENT_STEPS" --lr "$STUDENT_LR" --lr-backbone "$STUDENT_LR" \
      --eval-every 1000 && touch "$run/done"
  done
done

$PYTHON benchmarks/summarize_ablation.py "$OUT"
