"""`make demo`: segment the bundled example rasters with the bundled models, as a user would (through the CLI),
and draw each result over its image: out/NAME.gpkg and out/NAME.png.

Usage: python examples/run_demo.py [--out out] [--device auto]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

# Debian's mpl_toolkits (system site-packages) sits beside the venv's matplotlib; 3D axes aren't used here.
warnings.filterwarnings("ignore", message="Unable to import Axes3D")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyogrio  # noqa: E402
import rasterio  # noqa: E402
import rasterio.errors  # noqa: E402
import shapely  # noqa: E402
from matplotlib.patches import PathPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

HERE = Path(__file__).resolve().parent

# (example file, model, extra CLI options). The SpaceNet sample is one panchromatic band: it is given to the
# RGB model as three copies of that band.
RUNS = [
    ("nwpu_021.jpg", "nwpu10", []),
    ("ssdd_001111.jpg", "ssdd-ship", ["--bands", "1"]),
    ("spacenet_atlanta.tif", "nwpu10", ["--bands", "1,1,1"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = [sys.executable, "-m", "rs_engine.cli"]
    for name, model, extra in RUNS:
        src = HERE / name
        gpkg = args.out / f"{src.stem}.gpkg"
        cmd = [*engine, "segment", str(src), "-o", str(gpkg), "--model", model, "--overwrite",
               "--device", args.device, "--progress", "none", *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        png = args.out / f"{src.stem}.png"
        preview(src, gpkg, png)
        print(f"  preview: {png}")
    return 0


def preview(raster: Path, gpkg: Path, png: Path) -> None:
    """Draw the raster (first band or RGB, 2-98 % stretch) and the polygons, coloured by class, with scores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        ds = rasterio.open(raster)
    with ds:
        img = ds.read(list(range(1, min(ds.count, 3) + 1))).astype(np.float32)
        georef = ds.crs is not None
        left, bottom, right, top = ds.bounds if georef else (0, -ds.height, ds.width, 0)
    lo, hi = np.percentile(img, [2, 98])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    meta, _, geoms, fields = pyogrio.raw.read(gpkg, layer="instances")
    names = dict(zip(meta["fields"], fields))
    fig, ax = plt.subplots(figsize=(10, 10 * img.shape[0] / img.shape[1]), dpi=100)
    ax.imshow(img, cmap="gray", extent=(left, right, bottom, top))
    classes = sorted(set(names["class_name"])) if len(geoms) else []
    colours = plt.get_cmap("tab10")
    for wkb, cls, score in zip(geoms, names.get("class_name", []), names.get("score", [])):
        geom = shapely.from_wkb(wkb)
        colour = colours(classes.index(cls) % 10)
        for poly in getattr(geom, "geoms", [geom]):
            ax.add_patch(PathPatch(_mpl_path(poly), facecolor=(*colour[:3], 0.25), edgecolor=colour, lw=1.2))
        x, y = geom.representative_point().coords[0]
        ax.text(x, y, f"{cls} {score:.2f}", color="white", fontsize=6, ha="center",
                bbox={"facecolor": colour, "alpha": 0.6, "pad": 1, "lw": 0})
    ax.set_title(f"{raster.name}: {len(geoms)} instances")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _mpl_path(poly: shapely.Polygon) -> MplPath:
    """A polygon with holes as one matplotlib path (even-odd filling keeps holes open)."""
    rings = [np.asarray(poly.exterior.coords)] + [np.asarray(r.coords) for r in poly.interiors]
    verts = np.concatenate(rings)
    codes = np.concatenate(
        [[MplPath.MOVETO] + [MplPath.LINETO] * (len(r) - 2) + [MplPath.CLOSEPOLY] for r in rings]
    )
    return MplPath(verts, codes)


if __name__ == "__main__":
    sys.exit(main())
