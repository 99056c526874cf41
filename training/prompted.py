"""Box-prompted mask quality of a Mask R-CNN's mask head: masks from the truth boxes, scored against the truth.

The metric of issue 16 (prompted outlining): each truth box of a COCO test split is the prompt; the model's
mask head predicts the object's mask inside it; the score is the mean mask IoU with the truth over all objects.
A Mask R-CNN mask head is a box-prompted mask predictor already (RoIAlign of the box on the FPN, then an FCN), so
this is the baseline a dedicated prompt decoder (SAM's, as RSPrompter uses it) must beat. The box gives no class:
the mask channel is that of the class the box head predicts for the box (``class_source="box_head"``, what a user
prompt gets), or the truth class (``"truth"``, an upper bound).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rs_engine.models.paste import paste_masks
from training.augment import make_target
from training.coco import CocoChips


@torch.inference_mode()
def box_prompt_masks(model: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Masks of a torchvision Mask R-CNN for given boxes on one image.

    Args:
        image: (C, H, W) normalised image of any size (zero-padded to a multiple of 32, as the model's transform
            batches images, but never resized).
        boxes: (K, 4) x1 y1 x2 y2 pixels, the prompts.
        labels: (K,) classes 1..num_classes whose mask channel to take; None: the box head's top class per box.

    Returns:
        (K, H, W) mask probabilities.
    """
    h, w = image.shape[-2:]
    # As the model's transform batches an image, without its resizing: zero padding to a multiple of 32.
    padded = torch.nn.functional.pad(image, (0, -w % 32, 0, -h % 32))[None]
    feats = model.backbone(padded)
    heads = model.roi_heads
    sizes = [(h, w)]
    if labels is None:
        pooled = heads.box_head(heads.box_roi_pool(feats, [boxes], sizes))
        logits, _ = heads.box_predictor(pooled)
        labels = logits[:, 1:].argmax(1) + 1  # the best foreground class
    pooled = heads.mask_head(heads.mask_roi_pool(feats, [boxes], sizes))
    cells = heads.mask_predictor(pooled)  # (K, classes + 1, M, M) logits
    cells = cells[torch.arange(len(boxes)), labels].sigmoid()[:, None]
    return paste_masks(cells, boxes, (h, w))[:, 0]


def evaluate_box_prompts(model: torch.nn.Module, dataset: CocoChips, device: str = "cpu",
                         max_images: int | None = None, class_source: str = "box_head") -> dict[str, Any]:
    """Mean mask IoU of masks prompted by the truth boxes, over all objects of ``dataset`` (and per class).

    Raises:
        ValueError: ``class_source`` not ``box_head`` or ``truth``.
    """
    if class_source not in ("box_head", "truth"):
        raise ValueError(f"class_source {class_source!r}: use box_head or truth")
    model.eval().to(device)
    mean = torch.tensor(dataset.spec.mean)[:, None, None]
    std = torch.tensor(dataset.spec.std)[:, None, None]
    ious: list[float] = []
    by_class: dict[str, list[float]] = {}
    for image_id in dataset.ids[:max_images] if max_images else dataset.ids:
        raw = dataset.load_image(image_id)
        truth, labels = dataset.instances(image_id, *raw.shape[-2:])
        # The boxes as training makes its targets; a polygon outside the image (no pixel) has none and is dropped.
        target = make_target(truth, labels, min_pixels=1)
        if not len(target["boxes"]):
            continue
        truth, labels = target["masks"].numpy(), target["labels"].numpy()
        img = ((torch.from_numpy(raw) - mean) / std).to(device)
        given = target["labels"].to(device) if class_source == "truth" else None
        masks = box_prompt_masks(model, img, target["boxes"].to(device), given)
        pred = (masks > 0.5).cpu().numpy()
        t = truth.astype(bool)
        inter = (pred & t).reshape(len(t), -1).sum(1)
        union = (pred | t).reshape(len(t), -1).sum(1)
        for iou, label in zip((inter / np.maximum(union, 1)).tolist(), labels.tolist(), strict=True):
            ious.append(iou)
            by_class.setdefault(dataset.class_names[label - 1], []).append(iou)
    return {
        "objects": len(ious),
        "mean_iou": round(float(np.mean(ious)), 4) if ious else float("nan"),
        "class_source": class_source,
        "per_class": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_class.items())},
    }
