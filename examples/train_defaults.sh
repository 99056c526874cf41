#!/usr/bin/env bash
# Train the bundled default models (README "Models"), resumably: re-run the same command after an interruption and
# it continues from OUT.resume.safetensors at the same batch; a finished step is skipped.
#   examples/train_defaults.sh nwpu    # nwpu10 0.3: ssm_hybrid_tiny from ImageNet EfficientNet-Lite0, NWPU VHR-10
#   examples/train_defaults.sh ssdd    # ssdd-ship 0.3: ssm_hybrid_tiny from ImageNet, SSDD (1 band, 256 px chips),
#                                      # 5 epochs or 155 minutes
#   examples/train_defaults.sh ssdd-teacher   # the EfficientNet-Lite2 teacher, same data, schedule and budget
#                                             # (nwpu-teacher likewise)
# Then score on the test split (the --record line is stored in the card) and bundle with examples/bundle_model.py.
# One job at a time, one thread (OMP_NUM_THREADS=1), so the machine's second core stays free for other work.
# WORK (default ../delineate-train, outside the repository) holds the model, resume, log and curve files.
# To train further, raise the budget: NWPU_MINUTES=300 NWPU_EPOCHS=12 examples/train_defaults.sh nwpu resumes
# the run with its cosine schedule stretched to the new budget (nwpu10 0.3 is the 100-minute run).
set -euo pipefail
SHARED=${DATA:-../shared/data}
WORK=${WORK:-../delineate-train}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"

# train_eval DATA OUT ARGS...: rs-train train an ssm_hybrid_tiny on DATA's train split into $WORK/OUT.safetensors
# (resumable), then score it on DATA's test split and record the metrics in its card.
train_eval() {
  local d=$1 out=$WORK/$2; shift 2
  "$PY" -m training.cli -v train --coco "$d/annotations/instances_train.json" --images "$d/images" \
    --model-config ssm_hybrid_tiny --scale-range 0.6,1.6 --checkpoint-minutes 5 --workers 0 --progress jsonl \
    --out "$out.safetensors" "$@"
  "$PY" -m training.cli evaluate --model "$out.safetensors" --coco "$d/annotations/instances_test.json" \
    --images "$d/images" --record test --json "$out.test.json"
}

for target in "$@"; do
  case $target in
    # Scale jitter 0.6-1.6: NWPU mixes 0.08 m and 0.5-2 m images, so a class comes at many pixel sizes; no training
    # GSD in the card (resampling to one GSD would be wrong for half of the data). The cosine schedule follows
    # whichever ends first, 5 epochs or 100 minutes of training, so a run cut by its budget still ends at a low LR.
    nwpu) train_eval "$SHARED/nwpu_vhr10" nwpu10-hybrid --init-backbone imagenet --bands 1,2,3 --chip-size 512 \
        --epochs "${NWPU_EPOCHS:-5}" --max-minutes "${NWPU_MINUTES:-100}" --batch-size 2 --lr 5e-4 --warmup-steps 50 \
        --name nwpu10 ;;
    ssdd) train_eval "$SHARED/ssdd" ssdd-ship-hybrid --init-backbone imagenet --bands 1 --chip-size 256 \
        --epochs "${SSDD_EPOCHS:-5}" --max-minutes "${SSDD_MINUTES:-155}" --batch-size 4 --lr 5e-4 --warmup-steps 50 \
        --name ssdd-ship ;;
    # ssdd-ship 0.5: the bundled 0.4 trained further (its resume file was lost with a machine): initialised from its
    # fp16 weights, a second cosine schedule at half the peak learning rate over SSDD_MORE_MINUTES (default 115).
    ssdd-more) train_eval "$SHARED/ssdd" ssdd-ship-more \
        --init "${SSDD_INIT:-rs_engine/weights/ssdd-ship.safetensors}" --bands 1 --chip-size 256 --epochs 12 \
        --max-minutes "${SSDD_MORE_MINUTES:-115}" --batch-size 4 --lr 2.5e-4 --warmup-steps 30 --seed 1 \
        --name ssdd-ship ;;
    # nwpu10 0.6 candidate: the bundled 0.5 trained further, as ssdd-more made ssdd-ship 0.5 (the 0.5 run's resume
    # file was lost with a machine): its fp16 weights, a second cosine schedule at half the peak learning rate over
    # NWPU_MORE_MINUTES (default 150), NWPU_MORE_EPOCHS (default 8).
    nwpu-more) train_eval "$SHARED/nwpu_vhr10" nwpu10-more \
        --init "${NWPU_INIT:-rs_engine/weights/nwpu10.safetensors}" --bands 1,2,3 --chip-size 512 \
        --epochs "${NWPU_MORE_EPOCHS:-8}" --max-minutes "${NWPU_MORE_MINUTES:-150}" --batch-size 2 --lr 2.5e-4 \
        --warmup-steps 30 --seed 1 --name nwpu10 ;;
    # nwpu10 with the depthwise-separable neck (issue 14, ModelConfig.neck "separable_fpn"): the bundled nwpu10's
    # weights, its FPN-output and RPN 3x3 convolutions replaced by depthwise-separable ones fitted to them on real
    # features (training/neck.py), then the whole network fine-tuned as nwpu-more, over NWPU_SEP_MINUTES. nwpu10 0.7
    # is this from 0.6 (NWPU_INIT: the bundled file is 0.7 itself since; README "Models" gets 0.6's from git).
    nwpu-sep) train_eval "$SHARED/nwpu_vhr10" nwpu10-sep --neck separable_fpn \
        --init "${NWPU_INIT:-rs_engine/weights/nwpu10.safetensors}" --bands 1,2,3 --chip-size 512 \
        --epochs "${NWPU_SEP_EPOCHS:-4}" --max-minutes "${NWPU_SEP_MINUTES:-90}" --batch-size 2 --lr 2.5e-4 \
        --warmup-steps 30 --seed 2 --name nwpu10 ;;
    ssdd-sep) train_eval "$SHARED/ssdd" ssdd-ship-sep --neck separable_fpn \
        --init "${SSDD_INIT:-rs_engine/weights/ssdd-ship.safetensors}" --bands 1 --chip-size 256 \
        --epochs "${SSDD_SEP_EPOCHS:-6}" --max-minutes "${SSDD_SEP_MINUTES:-60}" --batch-size 4 --lr 2.5e-4 \
        --warmup-steps 30 --seed 2 --name ssdd-ship ;;
    # The teachers (issue 13): EfficientNet-Lite2 Mask R-CNN from ImageNet, the same data, schedule and budget as the
    # nwpu / ssdd targets (a later --model-config overrides train_eval's), for the README's teacher rows.
    nwpu-teacher) train_eval "$SHARED/nwpu_vhr10" nwpu10-teacher-lite2 --model-config effnet_lite2 \
        --init-backbone imagenet --bands 1,2,3 --chip-size 512 --epochs "${NWPU_EPOCHS:-5}" \
        --max-minutes "${NWPU_MINUTES:-100}" --batch-size 2 --lr 5e-4 --warmup-steps 50 --name nwpu10-teacher-lite2 ;;
    ssdd-teacher) train_eval "$SHARED/ssdd" ssdd-teacher-lite2 --model-config effnet_lite2 --init-backbone imagenet \
        --bands 1 --chip-size 256 --epochs "${SSDD_EPOCHS:-5}" --max-minutes "${SSDD_MINUTES:-155}" --batch-size 4 \
        --lr 5e-4 --warmup-steps 50 --name ssdd-teacher-lite2 ;;
    *) echo "$target: use nwpu, ssdd, ssdd-more, nwpu-more, nwpu-sep, ssdd-sep, nwpu-teacher or ssdd-teacher" >&2
       exit 2 ;;
  esac
done
