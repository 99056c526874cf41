#!/usr/bin/env bash
# Small-budget distillation ablation on NWPU VHR-10 (docs/distillation.md):
#   scratch | none | fixed | adaptive | drd  (any subset, in order; default: all five)
# Each variant: distil ssm_tiny from EfficientNet-Lite0 ImageNet (default 60 steps of 4 chips of 256 px: the first
# 240 training images once; not for scratch), fine-tune the whole Mask R-CNN with the same budget (default 100 steps
# of 2 chips of 256 px: the first 200 training images once), evaluate mask AP on the first 40 test images. Teacher
# features are cached once and shared by the distillations. Larger budgets: DISTILL_IMAGES, DISTILL_EPOCHS,
# FT_IMAGES, FT_EPOCHS, EVAL_IMAGES (use a fresh WORK folder when changing them).
# Usage: examples/ablate_distillation.sh [variant ...]   (from the repository root; OMP_NUM_THREADS=1 is set here)
set -euo pipefail
D=${DATA:-../shared/data/nwpu_vhr10}
W=${WORK:-/work/delineate-train/distill}
NDI=${DISTILL_IMAGES:-240}; NDE=${DISTILL_EPOCHS:-1}; NFI=${FT_IMAGES:-200}; NFE=${FT_EPOCHS:-1}
NEV=${EVAL_IMAGES:-40}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$W/distill_images" "$W/cache"
# Unlabelled images for distillation: the first DISTILL_IMAGES training images (never the test split).
"$PY" - "$D" "$W" "$NDI" "$NFI" <<'PYEOF'
import json, os, sys
d, w = sys.argv[1:3]
ndi, nfi = int(sys.argv[3]), int(sys.argv[4])
coco = json.load(open(f"{d}/annotations/instances_train.json"))
images = coco["images"]
for i in images[:ndi]:
    dst = f"{w}/distill_images/{i['file_name']}"
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(f"{d}/images/{i['file_name']}"), dst)
# Fine-tuning set: the first nfi training images.
ids = {i["id"] for i in images[:nfi]}
sub = {**coco, "images": images[:nfi], "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
if not os.path.exists(f"{w}/finetune.json"):  # written once, atomically (parallel runs of this script)
    json.dump(sub, open(f"{w}/finetune.json.tmp{os.getpid()}", "w"))
    os.replace(f"{w}/finetune.json.tmp{os.getpid()}", f"{w}/finetune.json")
PYEOF
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(scratch none fixed adaptive drd)
for v in "${variants[@]}"; do
  init=()
  if [ "$v" != scratch ]; then
    case $v in
      none) opts=(--perturb none) ;;
      fixed) opts=(--perturb fixed --noise 0.2 --mask-ratio 0.2) ;;
      adaptive) opts=(--perturb adaptive --noise 0.2 --mask-ratio 0.2) ;;
      drd) opts=(--perturb adaptive --noise 0.2 --mask-ratio 0.2 --drd-weight 0.1) ;;
      *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
    nice -n 5 "$PY" -m training.cli distill --teacher efficientnet_lite0 --images "$W/distill_images" \
      --student-config ssm_tiny --chip-size 256 --batch-size 4 --epochs "$NDE" --lr 1e-3 --warmup-steps 10 \
      --workers 0 --cache-dir "$W/cache" "${opts[@]}" --out "$W/$v.backbone.safetensors" --progress none
    init=(--init-backbone "$W/$v.backbone.safetensors")
  fi
  nice -n 5 "$PY" -m training.cli train --coco "$W/finetune.json" --images "$D/images" --model-config ssm_tiny \
    --chip-size 256 --epochs "$NFE" --batch-size 2 --lr 5e-4 --warmup-steps 20 --workers 0 "${init[@]}" \
    --name "ablate-$v" --out "$W/$v.model.safetensors" --progress none
  nice -n 5 "$PY" -m training.cli evaluate --model "$W/$v.model.safetensors" \
    --coco "$D/annotations/instances_test.json" --images "$D/images" --max-images "$NEV" --json "$W/$v.test.json"
done
