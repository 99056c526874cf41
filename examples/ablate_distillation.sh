#!/usr/bin/env bash
# Distillation ablation (docs/distillation.md): the default student ssm_tiny fine-tuned with one equal budget from
#   scratch | none | fixed | adaptive | drd    (any subset, in order; default: all five)
# (ii-v) distil it first from EfficientNet-Lite0 ImageNet on unlabelled *training* images (never the test split):
#   none = clean input, fixed = noise 0.2 + masking 0.2 on every chip, adaptive = the adaptive rule around 0.2/0.2,
#   drd = adaptive + DRD (weight 0.1). Teacher features are cached once and shared by all distillations.
# Then fine-tune the whole Mask R-CNN with `rs-train train` and score mask AP on the test split.
#   DATASET=ssdd (default; 1-band SAR): distil on all 928 SSDD training images (232 steps of 4 chips of 256 px),
#     fine-tune as docs/pretraining.md's ablation (first 400 training images, 100 steps of 4 chips of 256 px),
#     evaluate on the whole test split (232 images).
#   DATASET=nwpu (RGB): distil on the first 240 training images (60 steps), fine-tune on the first 200 (100 steps of
#     2 chips of 256 px), evaluate on the first 40 test images.
# Budgets: DISTILL_IMAGES, DISTILL_EPOCHS, FT_IMAGES, FT_EPOCHS, EVAL_IMAGES (0 = all); FT_SEED gives a second
# fine-tuning seed from the same distilled backbone. Use a fresh WORK folder when changing budgets. Finished steps
# are skipped on a re-run, unfinished ones resume, so the script continues after an interruption. Two copies can
# run side by side on different variants (one thread each).
# Usage: [DATASET=nwpu] examples/ablate_distillation.sh [variant ...]   (from the repository root)
set -euo pipefail
DATASET=${DATASET:-ssdd}
SHARED=${DATA:-../shared/data}
FT_SEED=${FT_SEED:-0}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case $DATASET in
  ssdd) D=$SHARED/ssdd; W=${WORK:-../delineate-train/distill-ssdd}; bands=1
        NDI=${DISTILL_IMAGES:-928}; NFI=${FT_IMAGES:-400}; NEV=${EVAL_IMAGES:-0}; ft_batch=4; ft_lr=1e-3 ;;
  nwpu) D=$SHARED/nwpu_vhr10; W=${WORK:-../delineate-train/distill}; bands=1,2,3
        NDI=${DISTILL_IMAGES:-240}; NFI=${FT_IMAGES:-200}; NEV=${EVAL_IMAGES:-40}; ft_batch=2; ft_lr=5e-4 ;;
  *) echo "DATASET=$DATASET: use ssdd or nwpu" >&2; exit 2 ;;
esac
NDE=${DISTILL_EPOCHS:-1}; NFE=${FT_EPOCHS:-1}
mkdir -p "$W/distill_images" "$W/cache"
# Unlabelled images for distillation: the first DISTILL_IMAGES training images, by id (never the test split);
# the fine-tuning set: the first FT_IMAGES training images, by id.
"$PY" - "$D" "$W" "$NDI" "$NFI" <<'PYEOF'
import json, os, sys
d, w = sys.argv[1:3]
ndi, nfi = int(sys.argv[3]), int(sys.argv[4])
coco = json.load(open(f"{d}/annotations/instances_train.json"))
images = sorted(coco["images"], key=lambda i: i["id"])
for i in images[:ndi]:
    dst = f"{w}/distill_images/{os.path.basename(i['file_name'])}"
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(f"{d}/images/{i['file_name']}"), dst)
ids = {i["id"] for i in images[:nfi]}
sub = {**coco, "images": images[:nfi], "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
if not os.path.exists(f"{w}/finetune.json"):  # written once, atomically (parallel runs of this script)
    json.dump(sub, open(f"{w}/finetune.json.tmp{os.getpid()}", "w"))
    os.replace(f"{w}/finetune.json.tmp{os.getpid()}", f"{w}/finetune.json")
PYEOF
evaluate=()
[ "$NEV" != 0 ] && evaluate=(--max-images "$NEV")
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
    [ -f "$W/$v.backbone.safetensors" ] || nice -n 5 "$PY" -m training.cli distill --teacher efficientnet_lite0 \
      --images "$W/distill_images" --bands $bands --student-config ssm_tiny --chip-size 256 --batch-size 4 \
      --epochs "$NDE" --lr 1e-3 --warmup-steps 10 --workers 0 --cache-dir "$W/cache" "${opts[@]}" \
      --out "$W/$v.backbone.safetensors" --progress none
    init=(--init-backbone "$W/$v.backbone.safetensors")
  fi
  m=$W/$v.seed$FT_SEED
  [ -f "$m.model.safetensors" ] || nice -n 5 "$PY" -m training.cli train --coco "$W/finetune.json" \
    --images "$D/images" --bands $bands --model-config ssm_tiny --chip-size 256 --epochs "$NFE" \
    --batch-size $ft_batch --lr $ft_lr --warmup-steps 20 --workers 0 --seed "$FT_SEED" "${init[@]}" \
    --name "ablate-$v" --out "$m.model.safetensors" --progress none
  [ -f "$m.test.json" ] || nice -n 5 "$PY" -m training.cli evaluate --model "$m.model.safetensors" \
    --coco "$D/annotations/instances_test.json" --images "$D/images" "${evaluate[@]}" --json "$m.test.json"
done
# The table of docs/distillation.md: test metrics of every variant and fine-tuning seed finished so far in $W.
"$PY" - "$W" <<'PYEOF'
import glob, json, os, statistics, sys
w = sys.argv[1]
print("| start | seeds | test mask AP per seed | mean mask AP | mean mask AP50 | mean box AP |")
print("|---|---|---|---|---|---|")
for v in ("scratch", "none", "fixed", "adaptive", "drd"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(w, f"{v}.seed*.test.json")))]
    if runs:
        m = lambda k, s: statistics.mean(r[k][s] for r in runs)  # noqa: E731
        print(f"| {v} | {len(runs)} | {', '.join(str(r['segm']['AP']) for r in runs)} | {m('segm', 'AP'):.2f} "
              f"| {m('segm', 'AP50'):.2f} | {m('bbox', 'AP'):.2f} |")
PYEOF
