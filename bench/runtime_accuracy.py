"""Does a runtime change what the model finds? Test-split mask and box AP of one model through each runtime.

Usage::

    .venv/bin/python bench/runtime_accuracy.py [--model nwpu10] [--runtimes torch,onnx,openvino:f32,openvino]
        [--threads 1] [--max-images N] [--out bench/results]

Each runtime segments the NWPU VHR-10 test images (``../shared/data/nwpu_vhr10``, 163) through the same tiled
pipeline as ``rs-engine segment`` (512 px tiles, the card's overlap, merging, polygons, the card's score threshold:
the bundled ``.onnx`` graphs drop lower scores inside the graph, so every runtime is scored at it),
one model load per runtime; the polygons are rasterised back on each image's pixel grid and scored with
pycocotools against the test annotations. ``openvino:PRECISION`` sets ``DELINEATE_OPENVINO_PRECISION`` (f32, bf16,
f16); plain ``openvino`` is OpenVINO's default for this CPU (bf16 where it has AMX or AVX512-BF16), with its scans
in the fused C kernel; ``openvino-graph`` runs the exported standard-operator scan instead. The pipeline's
AP differs from ``rs-train evaluate``'s (whole images, no polygons): compare the rows with each other. Writes
``runtime_accuracy.json`` and ``.md`` (with the CPU and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nwpu10")
    ap.add_argument("--data", type=Path, default=SHARED / "nwpu_vhr10")
    ap.add_argument("--runtimes", default="torch,onnx,openvino:f32,openvino")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    coco = json.loads((args.data / "annotations" / "instances_test.json").read_text())
    images = sorted(coco["images"], key=lambda i: i["id"])[: args.max_images]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rt-acc-") as tmp:
        paths = [args.data / "images" / im["file_name"] for im in images]  # one segment() call per runtime
        for spec in args.runtimes.split(","):
            rows.append(run_one(spec, args, paths, Path(tmp) / f"{spec.replace(':', '_')}.gpkg", coco, images))
            print(json.dumps(rows[-1]), flush=True)
    rec = {"machine": machine(), "model": args.model, "images": len(images), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_accuracy.json").write_text(json.dumps(rec, indent=1))
    m = rec["machine"]
    lines = [f"{args.model}, {args.data.name} test split ({len(images)} images) through the tiled pipeline, "
             f"{args.threads} thread(s); {m['cpu']}, load average {m['loadavg_1min']} at the end", "",
             "| runtime | precision | mask AP | mask AP50 | box AP | objects | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['runtime']} | {r['precision']} | {r['segm']['AP']} | {r['segm']['AP50']} | {r['bbox']['AP']} "
              f"| {r['objects']} | {r['seconds']} |" for r in rows]
    (args.out / "runtime_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_one(spec: str, args: argparse.Namespace, paths: list[Path], out: Path, coco: dict, images: list[dict]) -> dict:
    """Segment ``paths`` with one runtime (``NAME`` or ``openvino:PRECISION``) and score its polygons."""
    import geopandas

    from rs_engine import runtime as rt
    from rs_engine.pipeline import SegmentOptions, segment

    name, _, precision = spec.partition(":")
    if precision:
        os.environ[rt.PRECISION_ENV] = precision
    else:
        os.environ.pop(rt.PRECISION_ENV, None)
    if name.endswith("-graph"):  # OpenVINO with the exported standard-operator scan instead of the fused kernel
        name = name.removesuffix("-graph")
        os.environ[rt.SCAN_ENV] = "graph"
    else:
        os.environ.pop(rt.SCAN_ENV, None)
    predictor, card = rt.load_predictor(args.model, runtime=name, device="cpu", threads=args.threads)
    t = time.perf_counter()
    segment(paths, out, SegmentOptions(model=args.model, runtime=name, device="cpu", threads=args.threads,
                                          streams=1), predictor=predictor, card=card)
    seconds = time.perf_counter() - t
    pred = geopandas.read_file(out, layer="instances", engine="pyogrio")
    metrics = score(pred, coco, images, card.class_names)
    return {"runtime": name + (f" ({predictor.scan} scan)" if getattr(predictor, "scan", None) else ""),
            "precision": getattr(predictor, "precision", None) or "f32",
            "seconds": round(seconds, 1), "objects": len(pred), **metrics}


def score(pred, coco: dict, images: list[dict], class_names: list[str]) -> dict:
    """COCO mask and box AP of the pipeline's polygons (pixel frame x = column, y = -row) on the test images."""
    from affine import Affine
    from rasterio.features import rasterize

    from training.evaluate import _coco_eval, _rle

    cat_by_name = {c["name"]: c["id"] for c in coco["categories"]}
    if not set(class_names) <= set(cat_by_name):  # before any row's class is looked up
        raise SystemExit(f"the model's classes {class_names} are not the dataset's")
    pixel_frame = Affine(1, 0, 0, 0, -1, 0)
    results = []
    by_source = {Path(i["file_name"]).name: i for i in images}
    for row in pred.itertuples():
        im = by_source[row.source]
        m = rasterize([row.geometry], out_shape=(im["height"], im["width"]), transform=pixel_frame, dtype=np.uint8)
        if not m.any():
            continue
        x0, y0, x1, y1 = row.geometry.bounds  # y is -row
        results.append({"image_id": im["id"], "category_id": cat_by_name[row.class_name], "score": row.score,
                        "segmentation": _rle(m), "bbox": [x0, -y1, x1 - x0, y1 - y0]})
    ids = {i["id"] for i in images}
    gt = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    metrics = _coco_eval(gt, results, sorted(ids))
    return {"segm": metrics["segm"], "bbox": metrics["bbox"]}


if __name__ == "__main__":
    main()
