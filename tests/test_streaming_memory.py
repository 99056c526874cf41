"""Bounded memory: the pipeline's peak RSS does not grow with the raster (model left out: an empty predictor).

Each run is a fresh process so its peak RSS (``ru_maxrss``) is its own. GDAL's default block cache (5% of RAM)
made the peak grow with the raster size before the engine bounded it; this test fails on that regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, resource, sys, torch
from rs_engine.checkpoint import read_card
from rs_engine.pipeline import SegmentOptions, segment

def predictor(images):
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, *im.shape[-2:])} for im in images]

r = segment([sys.argv[1]], sys.argv[2], SegmentOptions(model="nwpu10", overwrite=True), predictor=predictor,
            card=read_card("nwpu10"))
print(json.dumps({"tiles": r.tiles, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _raster(path: Path, side: int) -> Path:
    """A side x side 3-band uint8 tiled GeoTIFF (a gradient: small on disk, ``3 side^2`` bytes decoded)."""
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32633",
                       transform=from_origin(500000, 4500000, 0.5, 0.5)) as ds:
        row = (np.arange(side, dtype=np.int64) % 251).astype(np.uint8)
        for r0 in range(0, side, 512):
            block = np.broadcast_to(row, (3, min(512, side - r0), side))
            ds.write(block, window=Window(0, r0, side, block.shape[1]))
    return path


def _peak(raster: Path, tmp: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, str(raster), str(tmp / f"{raster.stem}.gpkg")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_raster(tmp_path: Path) -> None:
    small = _peak(_raster(tmp_path / "r1024.tif", 1024), tmp_path)
    large = _peak(_raster(tmp_path / "r8192.tif", 8192), tmp_path)  # 192 MiB of pixels, 64x the small one
    assert (small["tiles"], large["tiles"]) == (9, 441)
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 60, (small, large)
