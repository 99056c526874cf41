"""Shared fixtures: synthetic rasters, model cards, a deterministic stand-in predictor, GeoPackage reading.

The stand-in predictor follows torchvision Mask R-CNN's eval-mode call convention, so tests run the real
pipeline (tiling, reading, merging, vectorising, writing) without a network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from pyogrio import raw as ogr_raw
from rasterio.errors import NotGeoreferencedWarning
from scipy import ndimage

from rs_engine.checkpoint import ModelCard

#: Pixel values of the synthetic scenes: background, class 1 objects, class 2 objects.
BACKGROUND, CLASS1, CLASS2 = 10, 100, 200
#: Default raster transform: 0.5 m pixels in UTM 16N.
DEFAULT_TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)


class LabelPredictor:
    """Deterministic stand-in for Mask R-CNN: one instance per 4-connected blob of each class value.

    Looks at band 1 of each (normalised) tile: pixels near ``values[i]`` form class ``i + 1`` blobs, so two
    touching objects of different classes stay two instances. Scores are ``score``; masks are exact (0/1).
    Counts calls and tiles so tests can see what was predicted.
    """

    def __init__(
        self, values: tuple[float, ...] = (CLASS1, CLASS2), tolerance: float = 40.0, score: float = 0.9
    ):
        self.values = values
        self.tolerance = tolerance
        self.score = score
        self.calls = 0
        self.tiles = 0

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        self.calls += 1
        self.tiles += len(images)
        return [self._predict(np.asarray(image[0])) for image in images]

    def _predict(self, band: np.ndarray) -> dict[str, torch.Tensor]:
        masks, boxes, labels = [], [], []
        for class_id, value in enumerate(self.values, start=1):
            blobs, _ = ndimage.label(np.abs(band - value) < self.tolerance)
            for k, (rows, cols) in enumerate(ndimage.find_objects(blobs), start=1):
                masks.append(blobs == k)
                boxes.append([cols.start, rows.start, cols.stop, rows.stop])
                labels.append(class_id)
        h, w = band.shape
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.full((len(labels),), self.score),
            "masks": torch.from_numpy(np.asarray(masks, dtype=np.float32).reshape(-1, 1, h, w)),
        }


class FixedPredictor:
    """Predicts the same instance in every tile: ``mask`` (T, T) in tile pixels, whatever the pixels are."""

    def __init__(self, mask: np.ndarray, label: int = 1, score: float = 0.8):
        self.mask = mask
        self.label = label
        self.score = score

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        mask = torch.from_numpy(self.mask.astype(np.float32))[None, None]
        return [
            {
                "boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                "labels": torch.tensor([self.label]),
                "scores": torch.tensor([self.score]),
                "masks": mask,
            }
            for _ in images
        ]


@pytest.fixture
def write_raster(tmp_path: Path) -> Callable[..., Path]:
    """``write_raster(data, name="scene.tif", transform=..., crs=..., nodata=None, **profile) -> Path``.

    ``data`` is (H, W) or (C, H, W); written as a tiled GeoTIFF into ``tmp_path``. ``transform=None`` and
    ``crs=None`` write a raster without georeferencing. Default: EPSG:32616, 0.5 m pixels.
    """

    def write(
        data: np.ndarray,
        name: str = "scene.tif",
        transform: Affine | None = DEFAULT_TRANSFORM,
        crs: str | None = "EPSG:32616",
        nodata: float | None = None,
        **profile: Any,
    ) -> Path:
        data = data[None] if data.ndim == 2 else data
        path = tmp_path / name
        options = dict(
            driver="GTiff",
            width=data.shape[2],
            height=data.shape[1],
            count=data.shape[0],
            dtype=data.dtype,
            tiled=True,
            blockxsize=64,
            blockysize=64,
        )
        if transform is not None:
            options["transform"] = transform
        if crs is not None:
            options["crs"] = crs
        if nodata is not None:
            options["nodata"] = nodata
        options.update(profile)
        if options["driver"] != "GTiff":
            for key in ("tiled", "blockxsize", "blockysize"):
                options.pop(key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path, "w", **options) as dst:
                dst.write(data)
        return path

    return write


@pytest.fixture
def make_card() -> Callable[..., ModelCard]:
    """``make_card(bands=1, tile_size=64, overlap=16, gsd=None, mean=0, std=1, ...) -> ModelCard``.

    mean 0 and std 1 keep normalised pixels equal to raw values, which the stand-in predictors look at.
    """

    def make(
        bands: int = 1,
        tile_size: int = 64,
        overlap: int = 16,
        gsd: float | None = None,
        mean: float = 0.0,
        std: float = 1.0,
        class_names: tuple[str, ...] = ("building", "tank"),
        score_threshold: float = 0.5,
    ) -> ModelCard:
        return ModelCard(
            name="test",
            version="0",
            architecture={},
            class_names=list(class_names),
            bands=bands,
            mean=[mean] * bands,
            std=[std] * bands,
            gsd=gsd,
            tile_size=tile_size,
            overlap=overlap,
            score_threshold=score_threshold,
        )

    return make


@pytest.fixture
def label_predictor() -> type[LabelPredictor]:
    """The :class:`LabelPredictor` class (instantiate per run; it counts tiles)."""
    return LabelPredictor


@pytest.fixture
def fixed_predictor() -> type[FixedPredictor]:
    """The :class:`FixedPredictor` class."""
    return FixedPredictor


@pytest.fixture
def read_gpkg() -> Callable[[Path], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``read_gpkg(path) -> (layer info, rows)``; each row maps field names to values plus ``geometry``
    (a shapely geometry)."""

    def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        info = pyogrio.read_info(path, layer="instances")
        meta, _, geometry, field_data = ogr_raw.read(path, layer="instances")
        rows = []
        for i, wkb in enumerate(geometry):
            row = {name: values[i] for name, values in zip(meta["fields"], field_data, strict=True)}
            row["geometry"] = shapely.from_wkb(wkb)
            rows.append(row)
        return info, rows

    return read
