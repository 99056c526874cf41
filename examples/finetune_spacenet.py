"""Fine-tune on an analyst's own annotations, measured: SpaceNet Atlanta sample, train west, test east.

The raster (900 x 900 px, 0.5 m, 1-band uint16, EPSG:32616) and its 43 building footprints are split at the
raster's central meridian: the western half (23 buildings) is the annotated area (``--aoi``) that ``rs-train
finetune`` learns from; the eastern half (20 buildings) is never seen and is where the model is evaluated, through
the same tiled pipeline as ``rs-engine segment`` (``rs-train evaluate --raster --labels --aoi``), before and after.
The base model (``nwpu10``, RGB) gets the pan band repeated three times; it has no building class, so the
"before" row is class-agnostic (any object counts).

    .venv/bin/python examples/finetune_spacenet.py --out out/spacenet [--epochs 30] [--max-minutes 10] [--lr 1e-3]
        [--freeze-stages N] [--upsample 2]

Writes ``OUT/{west,east}.geojson``, ``OUT/spacenet-buildings.safetensors``, ``OUT/{before,after}.json`` and prints
a markdown table (mask AP50, mask AP, F1 at IoU 0.5, minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import rasterio

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "spacenet_samples"


def write_halves(raster: Path, out: Path) -> tuple[Path, Path]:
    """West and east halves of the raster's extent as GeoJSON polygons in its CRS."""
    with rasterio.open(raster) as ds:
        b, crs = ds.bounds, ds.crs
    mid = (b.left + b.right) / 2
    paths = []
    for name, (x0, x1) in {"west": (b.left, mid), "east": (mid, b.right)}.items():
        ring = [[x0, b.bottom], [x1, b.bottom], [x1, b.top], [x0, b.top], [x0, b.bottom]]
        fc = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs.to_string()}},
              "features": [{"type": "Feature", "properties": {"name": name},
                            "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
        path = out / f"{name}.geojson"
        path.write_text(json.dumps(fc))
        paths.append(path)
    return paths[0], paths[1]


def upsampled(raster: Path, factor: int, out: Path) -> Path:
    """The raster resampled (bilinear) to ``factor`` times finer pixels, same extent and CRS: training and
    evaluating on it is working at a GSD ``factor`` times finer (objects ``factor`` times larger in pixels)."""
    from rasterio.enums import Resampling

    path = out / f"{raster.stem}_x{factor}.tif"
    with rasterio.open(raster) as ds:
        profile = ds.profile
        data = ds.read(out_shape=(ds.count, ds.height * factor, ds.width * factor), resampling=Resampling.bilinear)
        transform = ds.transform * ds.transform.scale(1 / factor, 1 / factor)
    profile.update(width=data.shape[2], height=data.shape[1], transform=transform, tiled=True, blockxsize=256,
                   blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def rs_train(*args: object) -> dict:
    cmd = [sys.executable, "-m", "training.cli", *map(str, args)]
    print("$ rs-train " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(r.returncode)
    return json.loads(r.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/spacenet"))
    p.add_argument("--base-model", default="nwpu10")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--upsample", type=int, default=1,
                   help="train and evaluate on the raster resampled to N times finer pixels (default 1: as it is)")
    p.add_argument("--freeze-stages", type=int, default=0,
                   help="freeze the stem and the first N backbone stages (rs-train finetune --freeze-stages)")
    args = p.parse_args()
    raster, labels = DATA / "sample_geotiff.tif", DATA / "geotiff_labels.geojson"
    if not raster.exists():
        sys.exit(f"{raster}: not found (this example needs ../shared/data)")
    args.out.mkdir(parents=True, exist_ok=True)
    west, east = write_halves(raster, args.out)
    if args.upsample > 1:
        raster = upsampled(raster, args.upsample, args.out)
    model = args.out / "spacenet-buildings.safetensors"
    for stale in args.out.glob("spacenet-buildings.*"):
        stale.unlink()  # a fresh run each time (rs-train would otherwise resume)
    common = ["--raster", raster, "--labels", labels, "--class-field", "building"]

    before = rs_train("evaluate", "--model", args.base_model, *common, "--aoi", east, "--bands", "1,1,1",
                      "--class-agnostic", "--json", args.out / "before.json")
    t0 = time.monotonic()
    rs_train("finetune", *common, "--aoi", west, "--base-model", args.base_model, "--out", model,
             "--chip-size", "256", "--epochs", args.epochs, "--max-minutes", args.max_minutes,
             "--lr", args.lr, "--val-fraction", "0", "--progress", "none",
             "--freeze-stages", args.freeze_stages)
    minutes = (time.monotonic() - t0) / 60
    after = rs_train("evaluate", "--model", model, *common, "--aoi", east, "--json", args.out / "after.json",
                     "--record", "east-half")

    print("| model | east half: mask AP50 | mask AP | box AP50 | F1 @ IoU 0.5 (P / R) | fine-tuning |")
    print("|---|---|---|---|---|---|")
    for name, m, t in ((f"{args.base_model} (before, class-agnostic)", before, "-"),
                       ("fine-tuned on the west half", after, f"{minutes:.1f} min")):
        f1 = m["f1@0.5"]
        print(f"| {name} | {m['segm']['AP50']:.1f} | {m['segm']['AP']:.1f} | {m['bbox']['AP50']:.1f} | "
              f"{f1['f1']:.2f} ({f1['precision']:.2f} / {f1['recall']:.2f}) | {t} |")


if __name__ == "__main__":
    main()
