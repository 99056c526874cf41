"""The pipeline can learn masks: overfitting four real NWPU VHR-10 chips reaches mask IoU >= 0.9 in 300 steps.

A sanity check before any long run (issue: the masks of an under-trained model covered a fifth of each airplane,
which could have been a bug in mask targets, RoIAlign alignment, polygon rasterisation or the mask head). Real
chips, the real training loop (:func:`training.train.train`), the default hybrid backbone from ImageNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rs_engine.checkpoint import ModelCard
from rs_engine.models import ModelConfig, build_model

NWPU = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nwpu_vhr10"
# Training images whose objects (2 airplanes, 2 baseball diamonds, 2 storage tanks, 1 ship) all lie inside the
# top-left 256 px chip, so a chip holds whole objects.
IMAGE_IDS = [24, 103, 326, 295]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_overfit_four_real_chips_reaches_mask_iou_0_9(tmp_path: Path) -> None:
    if not NWPU.is_dir():
        pytest.skip("../shared/data/nwpu_vhr10 is absent")
    from training.coco import ChipSpec, CocoChips, band_statistics
    from training.pretrain import init_backbone
    from training.train import TrainConfig, train

    coco = json.loads((NWPU / "annotations" / "instances_train.json").read_text())
    sub = {**coco, "images": [i for i in coco["images"] if i["id"] in IMAGE_IDS],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in IMAGE_IDS]}
    (tmp_path / "sub.json").write_text(json.dumps(sub))
    spec = ChipSpec(256, [0, 1, 2], [0.0] * 3, [1.0] * 3)
    chips = CocoChips(tmp_path / "sub.json", NWPU / "images", spec, train=False)  # fixed top-left chips
    spec.mean, spec.std = band_statistics(chips)
    config = ModelConfig(backbone="ssm_hybrid_tiny", num_classes=len(chips.class_names), tile_size=256)
    torch.manual_seed(0)
    model = build_model(config)
    init_backbone(model, "imagenet", config.backbone, spec.mean, spec.std)
    card = ModelCard(name="overfit", version="0", architecture=config.to_dict(), class_names=chips.class_names,
                     bands=3, mean=spec.mean, std=spec.std, tile_size=256, overlap=64, score_threshold=0.5)
    train(model, card, chips, tmp_path / "m.safetensors",
          TrainConfig(epochs=150, batch_size=2, lr=1e-3, warmup_steps=20, num_workers=0, half=False))  # 300 steps
    model.eval()
    ious = []
    with torch.no_grad():
        for i in range(len(chips)):
            x, target = chips[i]
            pred = model([x])[0]["masks"][:, 0] > 0.5
            assert len(target["masks"]) > 0
            for truth in target["masks"].bool():
                inter = (pred & truth).flatten(1).sum(1).float()
                union = (pred | truth).flatten(1).sum(1).float()
                ious.append(float((inter / union.clamp(min=1)).max()) if len(pred) else 0.0)
    assert len(ious) == 7
    # Measured after 200 steps: 0.907 (airplanes 0.82-0.84: thin wings at the 28 x 28 mask resolution; the others
    # 0.9-0.97); 300 steps leave a margin for other thread counts.
    assert np.mean(ious) >= 0.9, [round(v, 3) for v in ious]
