"""COCO mask and box AP of a model on a COCO dataset (pycocotools), images run whole (no tiling, no resizing)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from training.coco import CocoChips

log = logging.getLogger(__name__)

STAT_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]


@torch.inference_mode()
def predict_image(model: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run a Mask R-CNN on one whole (C, H, W) normalised image at its own size (padded to a multiple of 32)."""
    h, w = image.shape[-2:]
    t = model.transform
    old = (t.min_size, t.max_size)
    t.min_size, t.max_size = (min(h, w),), max(h, w)  # scale factor 1: no resizing
    try:
        return model([image])[0]
    finally:
        t.min_size, t.max_size = old


def evaluate_coco(model: torch.nn.Module, dataset: CocoChips, device: str = "cpu",
                  max_images: int | None = None, score_threshold: float = 0.0) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``dataset`` (mask and box AP, AP50, AP75, AP small/medium/large).

    Returns:
        ``{"segm": {name: value}, "bbox": {...}, "images": n}``; AP values in 0-100.
    """
    model.eval().to(device)
    ids = dataset.ids[:max_images] if max_images else dataset.ids
    mean = torch.tensor(dataset.spec.mean)[:, None, None]
    std = torch.tensor(dataset.spec.std)[:, None, None]
    results: list[dict[str, Any]] = []
    for image_id in ids:
        img = (torch.from_numpy(dataset.load_image(image_id)) - mean) / std
        out = predict_image(model, img.to(device))
        keep = out["scores"] >= score_threshold
        masks = (out["masks"][keep, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for box, label, score, m in zip(out["boxes"][keep].tolist(), out["labels"][keep].tolist(),
                                        out["scores"][keep].tolist(), masks):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            results.append({
                "image_id": image_id, "category_id": dataset.cat_ids[label - 1], "score": score,
                "segmentation": rle, "bbox": [x1, y1, x2 - x1, y2 - y1],
            })
    metrics: dict[str, Any] = {"images": len(ids)}
    for iou_type in ("segm", "bbox"):
        if not results:
            metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = dataset.coco.loadRes(results)
            ev = COCOeval(dataset.coco, dt, iou_type)
            ev.params.imgIds = list(ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {n: round(float(v) * 100, 2) for n, v in zip(STAT_NAMES, ev.stats[:6])}
    return metrics
