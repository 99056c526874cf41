"""COCO mask and box AP of a model on a COCO dataset (pycocotools), images run whole (no tiling, no resizing)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from training.coco import CocoChips

log = logging.getLogger(__name__)

STAT_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"]


@torch.inference_mode()
def predict_image(model: torch.nn.Module, image: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Run a Mask R-CNN on one whole (C, H, W) normalised image at its own size (padded to a multiple of 32), or
    resized by ``scale`` (bilinear, by torchvision's transform; boxes and masks come back at the image's size)."""
    h, w = image.shape[-2:]
    t = model.transform
    old = (t.min_size, t.max_size)
    t.min_size, t.max_size = (round(min(h, w) * scale),), round(max(h, w) * scale)  # scale 1: no resizing
    try:
        return model([image])[0]
    finally:
        t.min_size, t.max_size = old


def evaluate_coco(model: torch.nn.Module, dataset: CocoChips, device: str = "cpu",
                  max_images: int | None = None, score_threshold: float = 0.0, scale: float = 1.0) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``dataset`` (mask and box AP, AP50, AP75, AP small/medium/large), each image
    predicted whole, resized by ``scale`` (:func:`predict_image`; 1: as it is).

    Returns:
        ``{"segm": {name: value}, "bbox": {...}, "images": n}`` as :func:`coco_metrics`.
    """
    model.eval().to(device)
    ids = dataset.ids[:max_images] if max_images else dataset.ids
    mean = torch.tensor(dataset.spec.mean)[:, None, None]
    std = torch.tensor(dataset.spec.std)[:, None, None]
    results: list[dict[str, Any]] = []
    for image_id in ids:
        img = (torch.from_numpy(dataset.load_image(image_id)) - mean) / std
        out = predict_image(model, img.to(device), scale)
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
    return {"images": len(ids), **coco_metrics(dataset.coco, results, list(ids))}


def coco_metrics(coco: Any, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, dict[str, float]]:
    """COCOeval's summary (pycocotools) of ``results`` against ``coco`` on ``image_ids``, for masks and boxes.

    Returns:
        ``{"segm": {name: value}, "bbox": {...}}`` over :data:`STAT_NAMES`, AP in 0-100; -1 where the images
        hold no ground truth of a size range (pycocotools' own -1, kept as such: it is not a score). No
        detections at all, or no ground truth at all: every value 0.
    """
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in ("segm", "bbox"):
        if not results or not coco.getAnnIds(imgIds=image_ids):
            metrics[iou_type] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            ev = COCOeval(coco, coco.loadRes(results), iou_type)
            ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics[iou_type] = {n: round(float(v) * 100, 2) if v >= 0 else -1.0 for n, v in zip(STAT_NAMES, ev.stats)}
    return metrics


def _coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, Any]:
    """Run COCOeval (segm and bbox) on an in-memory GT dict and detection list; AP values in 0-100."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    return {"images": len(image_ids), **coco_metrics(coco, results, image_ids)}


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _gt_annotation(ann_id: int, image_id: int, mask: np.ndarray, label: int) -> dict[str, Any]:
    rle = _rle(mask)
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return {"id": ann_id, "image_id": image_id, "category_id": label, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0}


def evaluate_chips(model: torch.nn.Module, dataset: torch.utils.data.Dataset, class_names: list[str],
                   device: str = "cpu") -> dict[str, Any]:
    """COCO mask and box AP of ``model`` over the chips of ``dataset`` (each chip one evaluation image).

    Used for validation on local annotations (:class:`training.local.LocalChips` with ``train=False``), whose
    chips are the deterministic windows of the validation area.

    Args:
        dataset: items ``(image (C, S, S) float32 normalised, target)`` with ``masks`` (K, S, S), ``labels`` (K,).

    Returns:
        ``{"segm": {...}, "bbox": {...}, "images": n}``; AP values 0-100 (-1: no ground truth of that size).
    """
    model.eval().to(device)
    gt: dict[str, Any] = {"images": [], "annotations": [],
                          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    results: list[dict[str, Any]] = []
    for image_id in range(len(dataset)):
        image, target = dataset[image_id]
        h, w = image.shape[-2:]
        gt["images"].append({"id": image_id, "width": int(w), "height": int(h)})
        for m, label in zip(target["masks"].numpy(), target["labels"].tolist()):
            gt["annotations"].append(_gt_annotation(len(gt["annotations"]) + 1, image_id, m, label))
        out = predict_image(model, image.to(device))
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy()
        for box, label, score, m in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(),
                                        masks):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_id, "category_id": label, "score": score, "segmentation": _rle(m),
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return _coco_eval(gt, results, list(range(len(dataset))))


def match_f1(pred: list, pred_scores: list[float], pred_labels: list[int], truth: list, truth_labels: list[int],
             iou: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of polygons at an IoU threshold: greedy one-to-one matching of predictions in
    descending score order to the unmatched ground-truth polygon of the same label with the highest IoU
    (the SpaceNet building-footprint metric, Van Etten et al. 2018).

    Args:
        pred, truth: shapely polygons in one CRS; ``*_labels`` class ids (all equal for class-agnostic).

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn"}``.
    """
    from shapely import STRtree

    tree = STRtree(truth) if truth else None
    used: set[int] = set()
    tp = 0
    for i in sorted(range(len(pred)), key=lambda k: -pred_scores[k]):
        if tree is None:
            break
        best, best_iou = -1, iou
        for j in tree.query(pred[i]).tolist():
            if j in used or truth_labels[j] != pred_labels[i]:
                continue
            inter = pred[i].intersection(truth[j]).area
            union = pred[i].union(truth[j]).area
            if union > 0 and inter / union >= best_iou:
                best, best_iou = j, inter / union
        if best >= 0:
            used.add(best)
            tp += 1
    fp, fn = len(pred) - tp, len(truth) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "tp": tp, "fp": fp,
            "fn": fn}


#: Evaluation images are cut from the region in blocks of at most this many pixels a side (bounded memory).
EVAL_BLOCK = 2048


def evaluate_raster(model: str, rasters: list[Path], labels: Path, class_field: str, aoi: Path | None = None,
                    device: str = "auto", bands: list[int] | None = None, class_agnostic: bool = False,
                    tile_size: int | None = None, overlap: int | None = None,
                    ap_score_threshold: float = 0.05) -> dict[str, Any]:
    """COCO mask/box AP and polygon F1 at IoU 0.5 of a model on rasters with a ground-truth polygon layer, through
    the same tiled pipeline as ``rs-engine segment`` (tiling, cross-tile merging, polygons): what the analyst sees.

    Ground truth and predictions count where their centroid lies in the evaluation region: the AOI polygons when
    given, else each raster's extent. Masks are rasterised on the raster's pixel grid in blocks of up to
    :data:`EVAL_BLOCK` px (each block one COCO image; an object on a block border is cut the same way in truth
    and prediction). AP uses detections down to ``ap_score_threshold``; F1 uses the card's score threshold.

    Args:
        model: bundled model name or model file.
        class_agnostic: every class is one "object" class (for a model trained on other classes).

    Returns:
        ``{"segm": {...}, "bbox": {...}, "f1@0.5": {...}, "images": n, "objects": n_truth}``.

    Raises:
        InputError: bad raster, label layer, class field or AOI.
    """
    import tempfile

    import geopandas
    import shapely
    from rasterio.windows import Window, from_bounds
    from rasterio.windows import transform as window_transform

    from rs_engine.checkpoint import read_card
    from rs_engine.pipeline import SegmentOptions, segment
    from rs_engine.raster import georeference, open_raster
    from training.labels import load_aoi, load_labels

    card = read_card(model)
    with tempfile.TemporaryDirectory(prefix="rs-eval-") as tmp:
        pred_path = Path(tmp) / "pred.gpkg"
        segment([Path(r) for r in rasters], pred_path,
                SegmentOptions(model=model, device=device, bands=bands, tile_size=tile_size, overlap=overlap,
                               score_threshold=ap_score_threshold))
        predictions = geopandas.read_file(pred_path, layer="instances", engine="pyogrio")

    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    results: list[dict[str, Any]] = []
    f1_pred, f1_scores, f1_plabels, f1_truth, f1_tlabels = [], [], [], [], []
    names: dict[str, int] = {}

    def cat(name: str) -> int:
        key = "object" if class_agnostic else name
        if key not in names:
            names[key] = len(names) + 1
            gt["categories"].append({"id": names[key], "name": key})
        return names[key]

    for raster in rasters:
        with open_raster(raster) as ds:  # the frame the engine segmented it in (GCP fit included)
            (transform, crs), width, height = georeference(ds), ds.width, ds.height
        truth, truth_names = load_labels(labels, class_field, crs)
        raster_box = shapely.box(*_bounds(transform, width, height))
        region = load_aoi(aoi, crs).intersection(raster_box) if aoi else raster_box
        if region.is_empty:
            continue
        mine = predictions[predictions["source"] == Path(raster).name]
        if len(mine) and mine.crs is not None and crs is not None:
            mine = mine.to_crs(crs.to_wkt())  # the output CRS (--crs) may differ from the raster's
        geoms, p_names = list(mine.geometry), mine["class_name"].tolist()
        p_scores = mine["score"].astype(float).tolist()
        t_geoms = [g for g in truth.geometries]
        t_cats = [cat(truth_names[lab - 1]) for lab in truth.labels]
        t_in = [region.contains(g.centroid) for g in t_geoms]
        p_cats = [cat(str(n)) for n in p_names]
        p_in = [region.contains(g.centroid) for g in geoms]
        for g, c, ok in zip(t_geoms, t_cats, t_in):
            if ok:
                f1_truth.append(g)
                f1_tlabels.append(c)
        for g, c, s, ok in zip(geoms, p_cats, p_scores, p_in):
            if ok and s >= card.score_threshold:
                f1_pred.append(g)
                f1_plabels.append(c)
                f1_scores.append(float(s))
        win = from_bounds(*region.bounds, transform=transform).round_offsets().round_lengths()
        win = win.intersection(Window(0, 0, width, height))
        for r0 in range(int(win.row_off), int(win.row_off + win.height), EVAL_BLOCK):
            for c0 in range(int(win.col_off), int(win.col_off + win.width), EVAL_BLOCK):
                bw = min(EVAL_BLOCK, int(win.col_off + win.width) - c0)
                bh = min(EVAL_BLOCK, int(win.row_off + win.height) - r0)
                bt = window_transform(Window(c0, r0, bw, bh), transform)
                image_id = len(gt["images"]) + 1
                gt["images"].append({"id": image_id, "width": bw, "height": bh})
                block = shapely.box(*_bounds(bt, bw, bh))
                for m, k in _block_masks(t_geoms, t_in, block, (bh, bw), bt):
                    gt["annotations"].append(_gt_annotation(len(gt["annotations"]) + 1, image_id, m, t_cats[k]))
                for m, k in _block_masks(geoms, p_in, block, (bh, bw), bt):
                    rle = _rle(m)
                    results.append({"image_id": image_id, "category_id": p_cats[k], "score": float(p_scores[k]),
                                    "segmentation": rle, "bbox": mask_utils.toBbox(rle).tolist()})
    metrics = _coco_eval(gt, results, [i["id"] for i in gt["images"]])
    metrics["f1@0.5"] = match_f1(f1_pred, f1_scores, f1_plabels, f1_truth, f1_tlabels)
    metrics["objects"] = len(f1_truth)
    metrics["classes"] = [c["name"] for c in gt["categories"]]
    return metrics


def _bounds(transform: Any, width: int, height: int) -> tuple[float, float, float, float]:
    from rasterio.transform import array_bounds

    west, south, east, north = array_bounds(height, width, transform)
    return min(west, east), min(south, north), max(west, east), max(south, north)


def _block_masks(geoms: Any, inside: list[bool], block: Any, shape: tuple[int, int],
                 transform: Any) -> Any:
    """``(mask (h, w) uint8, index)`` of each geometry counted in the region (``inside``) that covers pixels of
    the evaluation block (map-coordinate box ``block``, pixel ``shape`` and ``transform``)."""
    from rasterio.features import rasterize

    for k, (g, ok) in enumerate(zip(geoms, inside)):
        if ok and g.intersects(block):
            m = rasterize([(g, 1)], out_shape=shape, transform=transform, dtype="uint8")
            if m.any():
                yield m, k
