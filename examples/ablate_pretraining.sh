#!/usr/bin/env bash
# Small-budget ablation of freq-mask pretraining on SSDD (SAR), see docs/pretraining.md.
# heat_tiny and ssm_tiny, each fine-tuned from scratch and from its freq-mask backbone with the same step budget,
# then scored on the SSDD test split (mask AP). Outputs go to $OUT (default ../delineate-train/pretrain),
# never into the repository. Runs one job at a time, 1 thread each, niced (a shared 2-core CPU).
set -euo pipefail
D=${D:-../shared/data}
OUT=${OUT:-../delineate-train/pretrain}
PRE_MIN=${PRE_MIN:-6}          # pretraining budget per backbone, minutes
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

# Fine-tuning set: the first 400 SSDD training images (by id): 100 steps of 4 chips, one epoch.
"$PY" - "$D" "$OUT" <<'PYEOF'
import json, sys
d, out = sys.argv[1:]
c = json.load(open(f"{d}/ssdd/annotations/instances_train.json"))
imgs = sorted(c["images"], key=lambda i: i["id"])[:400]
ids = {i["id"] for i in imgs}
json.dump({**c, "images": imgs, "annotations": [a for a in c["annotations"] if a["image_id"] in ids]},
          open(f"{out}/ssdd_train400.json", "w"))
PYEOF

for bb in heat_tiny ssm_tiny; do
  # 1. pretraining on the SSDD training images, without their labels
  nice -n 5 "$PY" -m training.cli pretrain --method freq-mask --images "$D/ssdd/images/train" --bands 1 \
      --backbone $bb --chip-size 256 --batch-size 4 --epochs 100 --lr 1.5e-3 --warmup-steps 20 \
      --max-minutes "$PRE_MIN" --workers 0 --progress none --out "$OUT/$bb-freqmask.safetensors"
  # 2. fine-tuning, same command with and without the pretrained backbone
  for init in scratch freqmask; do
    extra=()
    [ $init = freqmask ] && extra=(--init-backbone "$OUT/$bb-freqmask.safetensors")
    nice -n 5 "$PY" -m training.cli train --coco "$OUT/ssdd_train400.json" --images "$D/ssdd/images" --bands 1 \
        --model-config $bb --chip-size 256 --epochs 1 --batch-size 4 --lr 1e-3 --warmup-steps 20 --workers 0 \
        --progress none "${extra[@]}" --out "$OUT/ssdd-$bb-$init.safetensors"
    # 3. mask AP on the SSDD test split
    nice -n 5 "$PY" -m training.cli evaluate --model "$OUT/ssdd-$bb-$init.safetensors" \
        --coco "$D/ssdd/annotations/instances_test.json" --images "$D/ssdd/images" --json "$OUT/ssdd-$bb-$init.test.json"
  done
done
