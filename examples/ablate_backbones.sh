#!/usr/bin/env bash
# Backbone ablation (docs/models.md): where to cut the hybrid, at one small, equal CPU budget on NWPU VHR-10.
#   ssm_tiny (from scratch) | effnet_lite0 | ssm_hybrid_tiny (cut after stride 8) | ssm_hybrid_tiny16 (after 16),
#   the last three from ImageNet (--init-backbone imagenet). Any subset as arguments, in order; default: all four.
# Each trains one epoch of STEPS steps (default 120) of 2 chips of 256 px on the first 2 * STEPS NWPU training
# images by id, and is scored on the last 80 training images (held out; never the test split, so the choice is not
# tuned to it). Use a fresh WORK folder when changing STEPS.
# Then a table: val mask AP, AP50, box AP, params, GFLOPs at 1024 px, body seconds per 512 px tile (1 thread).
# Finished steps are skipped on a re-run, so the script continues after an interruption.
# Usage: examples/ablate_backbones.sh [backbone ...]   (from the repository root)
set -euo pipefail
SHARED=${DATA:-../shared/data}
W=${WORK:-../delineate-train/ablate-backbones}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-120}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
D=$SHARED/nwpu_vhr10
mkdir -p "$W"
"$PY" - "$D" "$W" "$STEPS" <<'PYEOF'
import json, os, sys
d, w, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
coco = json.load(open(f"{d}/annotations/instances_train.json"))
images = sorted(coco["images"], key=lambda i: i["id"])
assert 2 * steps <= len(images) - 80, "STEPS too large for the held-out split"
for name, part in (("train", images[:2 * steps]), ("val", images[-80:])):
    ids = {i["id"] for i in part}
    sub = {**coco, "images": part, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    if not os.path.exists(f"{w}/{name}.json"):
        json.dump(sub, open(f"{w}/{name}.json.tmp", "w"))
        os.replace(f"{w}/{name}.json.tmp", f"{w}/{name}.json")
PYEOF
variants=("$@")
[ ${#variants[@]} -eq 0 ] && variants=(ssm_tiny effnet_lite0 ssm_hybrid_tiny ssm_hybrid_tiny16)
for v in "${variants[@]}"; do
  init=()
  [ "$v" != ssm_tiny ] && init=(--init-backbone imagenet)
  m=$W/$v
  [ -f "$m.model.safetensors" ] || nice -n 5 "$PY" -m training.cli train --coco "$W/train.json" \
    --images "$D/images" --model-config "$v" "${init[@]}" --chip-size 256 --epochs 1 \
    --batch-size 2 --lr 5e-4 --warmup-steps 20 \
    --workers 0 --name "ablate-$v" --out "$m.model.safetensors" --progress none
  [ -f "$m.val.json" ] || nice -n 5 "$PY" -m training.cli evaluate --model "$m.model.safetensors" \
    --coco "$W/val.json" --images "$D/images" --json "$m.val.json"
done
"$PY" - "$W" <<'PYEOF'
import json, os, sys, time
import torch
from rs_engine.checkpoint import load_model
from rs_engine.models.build import count_flops
torch.set_num_threads(1)
w = sys.argv[1]
print("| backbone | val mask AP | AP50 | box AP | params (M, whole model) | body GFLOPs at 1024 px | body s per 512 px tile |")
print("|---|---|---|---|---|---|---|")
for v in ("ssm_tiny", "effnet_lite0", "ssm_hybrid_tiny", "ssm_hybrid_tiny16"):
    if not os.path.exists(f"{w}/{v}.val.json"):
        continue
    r = json.load(open(f"{w}/{v}.val.json"))
    model, card = load_model(f"{w}/{v}.model.safetensors")
    body = model.backbone.body.eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        body(x)
        t = time.perf_counter()
        for _ in range(3):
            body(x)
        sec = (time.perf_counter() - t) / 3
    f = count_flops(model, 1024)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"| {v} | {r['segm']['AP']} | {r['segm']['AP50']} | {r['bbox']['AP']} | {params:.1f} "
          f"| {f['backbone_gflops']:.1f} | {sec:.2f} |")
PYEOF
