#!/usr/bin/env bash
# Small-budget distillation ablation on NWPU VHR-10 (docs/distillation.md):
#   scratch | none | fixed | adaptive | drd  (any subset, in order; default: all five)
# Each variant: distil ssm_tiny from EfficientNet-Lite0 ImageNet (60 steps of 4 chips of 256 px; not for
# scratch), fine-tune the whole Mask R-CNN with the same budget (100 steps of 2 chips of 256 px), evaluate mask AP on
# the first 40 test images. Teacher features are cached once and shared by the four distillations.
# Usage: examples/ablate_distillation.sh [variant ...]   (from the repository root; OMP_NUM_THREADS=1 is set here)
set -euo pipefail
D=${DATA:-../shared/data/nwpu_vhr10}
W=${WORK:-/work/delineate-train/distill}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$W/train240" "$W/cache"
# Unlabelled images for distillation: the first 240 training images (never the test split).
"$PY" - "$D" "$W" <<'PYEOF'
import json, os, sys
d, w = sys.argv[1:3]
coco = json.load(open(f"{d}/annotations/instances_train.json"))
images = coco["images"]
for i in images[:240]:
    dst = f"{w}/train240/{i['file_name']}"
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(f"{d}/images/{i['file_name']}"), dst)
# Fine-tuning set: the first 200 training images (100 steps of 2 chips = one epoch).
ids = {i["id"] for i in images[:200]}
sub = {**coco, "images": images[:200], "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
if not os.path.exists(f"{w}/train200.json"):  # written once, atomically (parallel runs of this script)
    json.dump(sub, open(f"{w}/train200.json.tmp{os.getpid()}", "w"))
    os.replace(f"{w}/train200.json.tmp{os.getpid()}", f"{w}/train200.json")
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
    nice -n 5 "$PY" -m training.cli distill --teacher efficientnet_lite0 --images "$W/train240" \
      --student-config ssm_tiny --chip-size 256 --batch-size 4 --epochs 1 --lr 1e-3 --warmup-steps 10 \
      --workers 0 --cache-dir "$W/cache" "${opts[@]}" --out "$W/$v.backbone.safetensors" --progress none
    init=(--init-backbone "$W/$v.backbone.safetensors")
  fi
  nice -n 5 "$PY" -m training.cli train --coco "$W/train200.json" --images "$D/images" --model-config ssm_tiny \
    --chip-size 256 --epochs 1 --batch-size 2 --lr 5e-4 --warmup-steps 20 --workers 0 "${init[@]}" \
    --name "ablate-$v" --out "$W/$v.model.safetensors" --progress none
  nice -n 5 "$PY" -m training.cli evaluate --model "$W/$v.model.safetensors" \
    --coco "$D/annotations/instances_test.json" --images "$D/images" --max-images 40 --json "$W/$v.test.json"
done
