"""Prompted mask quality of a Mask R-CNN's heads: masks from the truth boxes or from one point per object, scored
against the truth.

The metrics of issue 16 (prompted outlining): each truth box (or the interior-most point of each truth mask) of a
COCO test split is the prompt; :class:`~rs_engine.models.prompter.MaskRCNNPrompter` predicts the object's mask; the
score is the mean mask IoU with the truth over all objects.
A Mask R-CNN mask head is a box-prompted mask predictor already (RoIAlign of the box on the FPN, then an FCN), so
this is the baseline a dedicated prompt decoder (SAM's, as RSPrompter uses it) must beat. The box gives no class:
the mask channel is that of the class the box head predicts for the box (``class_source="box_head"``, what a user
prompt gets), or the truth class (``"truth"``, an upper bound).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from rs_engine.models.prompter import MaskRCNNPrompter, prompter_for
from training.augment import make_target
from training.coco import CocoChips


def box_prompt_masks(model: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Masks of a torchvision Mask R-CNN for given boxes on one image (:class:`MaskRCNNPrompter`).

    Args:
        image: (C, H, W) normalised image of any size (zero-padded to a multiple of 32, never resized).
        boxes: (K, 4) x1 y1 x2 y2 pixels, the prompts.
        labels: (K,) classes 1..num_classes whose mask channel to take; None: the box head's top class per box.

    Returns:
        (K, H, W) mask probabilities.
    """
    prompter = MaskRCNNPrompter(model)
    return prompter.box_masks(prompter.embed(image), boxes, labels)[0]


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of a boolean (H, W) mask farthest from its boundary: the first click of interactive
    segmentation benchmarks (RITM, SAM's point evaluation)."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(x), int(y)


def evaluate_box_prompts(model: torch.nn.Module, dataset: CocoChips, device: str = "cpu",
                         max_images: int | None = None, class_source: str = "box_head") -> dict[str, Any]:
    """Mean mask IoU of masks prompted by the truth boxes, over all objects of ``dataset`` (and per class).

    Raises:
        ValueError: ``class_source`` not ``box_head`` or ``truth``.
    """
    if class_source not in ("box_head", "truth"):
        raise ValueError(f"class_source {class_source!r}: use box_head or truth")
    return _evaluate(model, dataset, device, max_images, "box", class_source)


def evaluate_point_prompts(model: torch.nn.Module, dataset: CocoChips, device: str = "cpu",
                           max_images: int | None = None) -> dict[str, Any]:
    """Mean mask IoU of masks prompted by one positive point per object (:func:`interior_point` of its truth
    mask), over all objects of ``dataset`` (and per class); an object the prompter finds nothing for counts 0.
    ``found`` is the share of objects that got a mask."""
    return _evaluate(model, dataset, device, max_images, "point", "box_head")


def _evaluate(model: torch.nn.Module, dataset: CocoChips, device: str, max_images: int | None, prompt: str,
              class_source: str) -> dict[str, Any]:
    model.eval().to(device)
    prompter = prompter_for(model)  # a model's SAM-style prompt head when it has one
    mean = torch.tensor(dataset.spec.mean)[:, None, None]
    std = torch.tensor(dataset.spec.std)[:, None, None]
    ious: list[float] = []
    found = 0
    by_class: dict[str, list[float]] = {}
    for image_id in dataset.ids[:max_images] if max_images else dataset.ids:
        raw = dataset.load_image(image_id)
        truth, labels = dataset.instances(image_id, *raw.shape[-2:])
        # The boxes as training makes its targets; a polygon outside the image (no pixel) has none and is dropped.
        target = make_target(truth, labels, min_pixels=1)
        if not len(target["boxes"]):
            continue
        t = target["masks"].numpy().astype(bool)
        emb = prompter.embed(((torch.from_numpy(raw) - mean) / std).to(device))
        if prompt == "box":
            given = target["labels"] if class_source == "truth" else None
            pred = (prompter.box_masks(emb, target["boxes"], given)[0] > 0.5).cpu().numpy()
            found += len(pred)
        else:
            pred = np.zeros_like(t)
            for k, m in enumerate(t):
                out = prompter.point(emb, np.array([interior_point(m)], dtype=np.float32))
                if out is not None:
                    pred[k] = out.mask > 0.5
                    found += 1
        inter = (pred & t).reshape(len(t), -1).sum(1)
        union = (pred | t).reshape(len(t), -1).sum(1)
        for iou, label in zip((inter / np.maximum(union, 1)).tolist(), target["labels"].tolist(), strict=True):
            ious.append(iou)
            by_class.setdefault(dataset.class_names[label - 1], []).append(iou)
    return {
        "objects": len(ious),
        "mean_iou": round(float(np.mean(ious)), 4) if ious else float("nan"),
        "prompt": prompt,
        "found": round(found / max(len(ious), 1), 4),
        "class_source": class_source,
        "per_class": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_class.items())},
    }
