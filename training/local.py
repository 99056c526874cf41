"""Training chips from an analyst's own annotations: one or more rasters + a polygon layer ("local annotations").

Inputs are what a GIS analyst has at hand: rasters (GeoTIFF or anything GDAL reads), a polygon layer (GeoPackage,
GeoJSON, Shapefile, any OGR vector) with a class field, and optionally AOI polygons marking where the annotation is
complete. Each item is a chip of ``spec.size`` px, as :class:`training.coco.CocoChips` gives: ``(image (C, S, S)
float32 normalised, target dict(boxes (K, 4) x1y1x2y2 px, labels (K,) int64 1..num_classes, masks (K, S, S)
uint8))``.

Decisions:

- **Labels** are read, reprojected, repaired and mapped to classes by :mod:`training.labels` (geopandas); a raster
  without a CRS and labels with one is an error (the labels can't be placed).
- **Annotated area.** With an AOI layer, its polygons (union, clipped to each raster) are the fully annotated
  area. Without one, the default is, per raster, the bounding box (in the raster's pixel grid) of the features
  touching that raster, expanded by half a chip on every side and clipped to the raster: the analyst is assumed
  to have labelled everything in the area they worked in, and the margin gives the edge objects context.
  Pixels outside the annotated area (or outside this split, see below) are set to 0 after normalisation (the
  band mean, as nodata) and instance masks are clipped to it, so unlabelled objects are never taught as
  background. Features that touch no raster are dropped with a warning (count and ids); features partly
  outside a raster keep their part inside it.
- **Train/validation split by area** (:mod:`training.area_split`): each raster's annotated area is cut by blocks
  of ``4 * spec.size`` px (``split_seed``, per raster); the training region is the annotated area minus the
  validation region, so the two never overlap and together cover the annotated area. Chips of one split are
  masked to that split's region (pixels of the other split are 0, its objects clipped away), so nothing leaks
  across the boundary, whatever the chip position.
- **Bands.** ``bands`` are 1-based raster band indexes (repeats allowed: ``[1, 1, 1]`` feeds a 1-band raster to a
  3-band model), as ``rs-engine --bands``. Without ``bands``, they are derived from ``spec.bands`` (0-based, the
  COCO convention): ``[b + 1 for b in spec.bands]``.
- **Pixels** are read window by window through :class:`rs_engine.raster.RasterSource` (no resampling), so chips
  get exactly the inference path's dtype handling: complex SAR -> magnitude, nodata / non-finite -> 0 after
  normalisation. Normalisation uses ``spec.mean`` / ``spec.std`` (raw raster units) at the time an item is read,
  so a caller may compute :meth:`LocalChips.band_statistics` first (with placeholder 0 / 1) and set them after.
- **Training chips** (``train=True``): a random centre inside the split region (rejection sampling), half of the
  chips centred near a random labelled object when the split has any (analysts' layers are sparse), then scale
  jitter (:func:`training.augment.crop_size` + :func:`~training.augment.resize`) and
  :func:`~training.augment.augment`. ``chips_per_epoch`` defaults to twice the number of chips that tile the
  region (at least 16). Random streams: ``rng = np.random.default_rng(seed)`` in the main process (the training
  loop reseeds it per epoch and DDP rank); in DataLoader workers, reseeded from ``(seed, worker seed)`` so
  workers differ from each other and from epoch to epoch.
- **Validation chips** (``train=False``): :meth:`LocalChips.windows`, tiles of ``spec.size`` covering the split
  region, no augmentation. Instances cut by a chip edge keep their visible part unless it is smaller than 20 % of
  the instance's area in the split (or 4 px), as in :mod:`training.coco`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features
import shapely
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

from rs_engine.errors import InputError
from rs_engine.raster import RasterSource
from rs_engine.tiling import plan_offsets
from training.area_split import split_by_area
from training.augment import AugmentConfig, augment, crop_size, make_target, resize
from training.bandstats import BandStatistics
from training.coco import ChipSpec
from training.labels import EMPTY, LabelSet, layer_crs, layer_info, load_aoi, load_labels, polygonal, report

log = logging.getLogger(__name__)

#: Side of the train/validation split blocks, in chips.
SPLIT_BLOCK_CHIPS = 4
#: Share of training chips centred near a labelled object (when the split has any).
OBJECT_CHIP_SHARE = 0.5
#: Instances cut by a chip edge are dropped when less than this share of their area (in the split) is visible.
MIN_VISIBLE = 0.2


# ------------------------------------------------------------------------------------------------ dataset


def _affine(geoms: Any, t: Affine) -> Any:
    """Apply an affine transform to shapely geometries (array or one geometry)."""
    def apply(c: np.ndarray) -> np.ndarray:
        return np.column_stack([t.a * c[:, 0] + t.b * c[:, 1] + t.c, t.d * c[:, 0] + t.e * c[:, 1] + t.f])

    return shapely.transform(geoms, apply)


@dataclass
class _Raster:
    """One raster's share of the dataset. Geometries are in the raster's pixel frame (x = column, y = row)."""

    path: Path
    transform: Affine
    crs: CRS | None
    width: int
    height: int
    annotated: BaseGeometry  # annotated area (AOI or default) clipped to the raster, pixel frame
    region: BaseGeometry  # this split's part of ``annotated``, pixel frame
    geoms: np.ndarray  # (N,) instances clipped to ``region``, pixel frame
    classes: np.ndarray  # (N,) int64 labels
    bounds: np.ndarray  # (N, 4) float64 of ``geoms``
    pixels: np.ndarray  # (N,) float64 area of ``geoms`` in px


class LocalChips(torch.utils.data.Dataset):
    """Chips from rasters + a polygon label layer (+ optional AOI), for Mask R-CNN training (module docstring).

    Args:
        rasters: raster files (any CRS each; labels and AOI are reprojected to each).
        labels: polygon layer with a class field.
        class_field: name of the class field.
        spec: chip size (px) and normalisation (``mean``/``std`` per band in raw raster units); ``spec.bands``
            gives the default ``bands``.
        aoi: polygon layer of the fully annotated areas; None: the labels' bounding box + half a chip per raster.
        class_names: classes to map to labels 1..K (fine-tuning); None: sorted distinct class values.
        split: ``"train"``, ``"val"`` or ``"all"`` (the whole annotated area).
        val_fraction: share of the annotated area held out for validation (0 <= f < 1).
        train: random chips with augmentation; otherwise the deterministic tiles of :meth:`windows`.
        chips_per_epoch: items per epoch when ``train``; None: twice the chips that tile the region, >= 16.
        seed: seed of the chip sampling and augmentation.
        augment: augmentation settings (default :class:`AugmentConfig`).
        bands: 1-based raster band indexes (repeats allowed); None: ``[b + 1 for b in spec.bands]``.
        split_seed: seed of the block order of the train/val split (keep it equal for the train and val sets).

    Attributes:
        class_names: label i is ``class_names[i - 1]``.
        bands: the 1-based band indexes read.
        labelsets: per raster, the labels touching it (raster CRS, not clipped).
        annotated: per raster, the annotated area clipped to the raster (raster CRS, map units).
        regions: per raster, this split's region where chips are cut (raster CRS, map units; may be empty).
        num_instances: instances with a part in this split.

    Raises:
        InputError: a raster, the labels or the AOI is missing or unreadable; a raster without CRS and labels with
            one; no class field (fields listed); unknown classes; no label or AOI overlapping a raster; the
            requested split is empty; bands the raster doesn't have.
    """

    def __init__(
        self,
        rasters: Sequence[str | Path],
        labels: str | Path,
        class_field: str,
        spec: ChipSpec,
        aoi: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        split: str = "all",
        val_fraction: float = 0.2,
        train: bool = True,
        chips_per_epoch: int | None = None,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        bands: Sequence[int] | None = None,
        split_seed: int = 0,
    ) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if not 0 <= val_fraction < 1:
            raise InputError(f"validation fraction {val_fraction}: must be at least 0 and less than 1")
        if not rasters:
            raise InputError("no raster given")
        labels, aoi = Path(labels), (Path(aoi) if aoi is not None else None)
        self.spec, self.split, self.train, self.seed = spec, split, train, seed
        self.augment = augment or AugmentConfig()
        self.bands = list(bands) if bands is not None else [b + 1 for b in spec.bands]
        if len(spec.mean) != len(self.bands) or len(spec.std) != len(self.bands):
            raise ValueError(f"spec has {len(spec.mean)}/{len(spec.std)} mean/std values for bands {self.bands}")
        labels_crs = layer_crs(labels)
        if aoi is not None:
            layer_info(aoi)

        label_cache: dict[str | None, LabelSet] = {}
        aoi_cache: dict[str | None, BaseGeometry] = {}
        names = list(class_names) if class_names is not None else None
        self._rasters: list[_Raster] = []
        self.labelsets: list[LabelSet] = []
        touched: set[int] = set()
        all_fids: set[int] = set()
        size = spec.size
        for r, path in enumerate(Path(p) for p in rasters):
            with self._open(path) as src:
                transform, crs, width, height = src.transform, src.crs, src.grid.width, src.grid.height
            if crs is None and labels_crs is not None:
                raise InputError(
                    f"{path}: raster has no CRS but {labels.name} is in {labels_crs.to_string()}; "
                    "assign the raster a CRS (or give labels without a CRS, in the raster's coordinates)"
                )
            key = crs.to_wkt() if crs is not None else None
            if key not in label_cache:
                label_cache[key], names = load_labels(labels, class_field, crs, names)
                if aoi is not None:
                    aoi_cache[key] = load_aoi(aoi, crs)
            layer = label_cache[key]
            all_fids.update(layer.fids)
            inverse = ~transform
            footprint = shapely.box(0, 0, width, height)
            geoms_px = _affine(np.array(layer.geometries, dtype=object), inverse)
            touching = shapely.intersects(geoms_px, footprint) & (shapely.area(shapely.intersection(
                geoms_px, footprint)) > 0)
            idx = np.flatnonzero(touching)
            touched.update(layer.fids[i] for i in idx)
            self.labelsets.append(LabelSet([layer.geometries[i] for i in idx], [layer.labels[i] for i in idx],
                                           [layer.fids[i] for i in idx]))
            if aoi is not None:
                annotated = polygonal(shapely.intersection(_affine(aoi_cache[key], inverse), footprint))
            elif len(idx):
                bx0, by0, bx1, by1 = shapely.total_bounds(geoms_px[idx])
                half = size / 2
                annotated = shapely.intersection(shapely.box(
                    math.floor(bx0 - half), math.floor(by0 - half), math.ceil(bx1 + half), math.ceil(by1 + half)
                ), footprint)
            else:
                annotated = None
            annotated = annotated if annotated is not None and annotated.area > 0 else EMPTY
            if annotated.is_empty:
                log.info("%s: no %s on this raster; it gives no chips", path.name,
                         "AOI" if aoi is not None else "labelled feature")
            if split == "all":
                region = annotated
            else:
                parts = split_by_area(annotated, SPLIT_BLOCK_CHIPS * size, val_fraction, [split_seed, r])
                region = parts[0] if split == "train" else parts[1]
            inst = polygonal_array(shapely.intersection(geoms_px[idx], region)) if len(idx) else np.empty(
                0, object)
            ok = np.array([g is not None and g.area > 0 for g in inst], bool)
            classes = np.array([layer.labels[i] for i in idx], np.int64)[ok] if len(idx) else np.empty(0, np.int64)
            inst = inst[ok]
            shapely.prepare(region)
            self._rasters.append(_Raster(
                path, transform, crs, width, height, annotated, region, inst, classes,
                shapely.bounds(inst).reshape(-1, 4), shapely.area(inst).astype(np.float64)))

        self.class_names: list[str] = names or []
        outside = sorted(all_fids - touched)
        report(labels, "ignored {n} feature(s) outside every raster", np.array(outside, np.int64))
        if all(ras.annotated.is_empty for ras in self._rasters):
            if aoi is not None:
                raise InputError(f"{aoi}: AOI does not overlap any raster (is it in the right CRS?)")
            raise InputError(f"{labels}: no labelled feature overlaps the raster(s) (are they in the right CRS?)")
        area_px = float(sum(ras.region.area for ras in self._rasters))
        if area_px <= 0:
            raise InputError(
                f"{labels.name}: the {split} split is empty (validation fraction {val_fraction}); "
                "give more annotated area or change the validation fraction"
            )
        self.annotated = [_affine(ras.annotated, ras.transform) for ras in self._rasters]
        self.regions = [_affine(ras.region, ras.transform) for ras in self._rasters]
        self.num_instances = int(sum(len(ras.geoms) for ras in self._rasters))
        if self.num_instances == 0:
            log.warning("%s: no labelled object in the %s split: its chips are all background", labels.name, split)
        self._areas = np.array([ras.region.area for ras in self._rasters], np.float64)
        self._objects = [(r, k) for r, ras in enumerate(self._rasters) for k in range(len(ras.geoms))]
        self._windows = self._plan_windows()
        self.chips_per_epoch = chips_per_epoch or max(16, math.ceil(2 * area_px / size**2))
        # ``rng`` is public: the training loop reseeds it per epoch and DDP rank (training.train).
        self.rng = np.random.default_rng(seed)
        self._rng_key: int | None = None
        self._sources: dict[int, RasterSource] = {}
        self._pid = os.getpid()
        log.info("%s split: %d raster(s), %d instance(s), %.0f px^2 of annotated area, classes %s", split,
                 len(self._rasters), self.num_instances, area_px, self.class_names)

    # -- dataset protocol

    def __len__(self) -> int:
        return self.chips_per_epoch if self.train else len(self._windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Chip ``index``: ``(image (C, S, S) float32 normalised, target)`` (see :func:`make_target`)."""
        s = self.spec.size
        if not self.train:
            r, window = self._windows[index]
            image, masks, labels, _ = self.cut(r, window)
            return torch.from_numpy(image), make_target(masks, labels)
        rng = self._worker_rng()
        c = crop_size(s, rng, self.augment)
        r, window = self.sample_window(rng, c)
        image, masks, labels, valid = self.cut(r, window)
        if c != s:
            stacked = np.concatenate([masks, valid[None].astype(np.uint8)])
            image, stacked = resize(image, stacked, s)
            masks, valid = stacked[:-1], stacked[-1].astype(bool)
        image, masks = augment(image, masks, rng, self.augment, valid)
        return torch.from_numpy(image), make_target(masks, labels)

    def windows(self) -> list[tuple[int, Window]]:
        """Deterministic chips covering this split's region: ``(raster index, Window)`` in source pixels.

        Tiles of ``spec.size`` px over each region's bounding box (the last row/column shifted back to end at
        the box's edge, as :func:`rs_engine.raster.plan_offsets`), keeping those that overlap the region. A
        window reaches past the raster only when the region is smaller than a chip (padding, 0).
        """
        return list(self._windows)

    def _plan_windows(self) -> list[tuple[int, Window]]:
        s = self.spec.size
        out: list[tuple[int, Window]] = []
        for r, ras in enumerate(self._rasters):
            if ras.region.is_empty:
                continue
            x0, y0, x1, y1 = ras.region.bounds
            x0, y0, x1, y1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
            boxes = [(x0 + dx, y0 + dy) for dy in plan_offsets(y1 - y0, s, 0) for dx in plan_offsets(x1 - x0, s, 0)]
            tiles = np.array([shapely.box(x, y, x + s, y + s) for x, y in boxes], dtype=object)
            overlap = shapely.area(shapely.intersection(tiles, ras.region)) > 0
            out.extend((r, Window(x, y, s, s)) for (x, y), ok in zip(boxes, overlap) if ok)
        return out

    # -- chips

    def sample_window(self, rng: np.random.Generator, size: int) -> tuple[int, Window]:
        """A random ``size`` x ``size`` px training window whose centre lies in the split region.

        With probability :data:`OBJECT_CHIP_SHARE` (when the split has instances) the centre is a random point of
        a random instance moved by up to a quarter chip (kept in the region); otherwise a uniform point of the
        region, rasters weighted by region area.

        Returns:
            ``(raster index, Window)`` in source pixels (may reach past the raster's edge).
        """
        if self._objects and rng.random() < OBJECT_CHIP_SHARE:
            r, k = self._objects[int(rng.integers(len(self._objects)))]
            region = self._rasters[r].region
            point = _random_point(self._rasters[r].geoms[k], rng)
            centre = point
            for _ in range(8):
                moved = point + rng.uniform(-size / 4, size / 4, 2)
                if shapely.contains_xy(region, moved[0], moved[1]):
                    centre = moved
                    break
        else:
            r = int(rng.choice(len(self._rasters), p=self._areas / self._areas.sum()))
            centre = _random_point(self._rasters[r].region, rng)
        x0, y0 = round(centre[0] - size / 2), round(centre[1] - size / 2)
        # Slide the window (keeping its centre inside it) into the region's box where it fits, so chips show
        # annotated pixels rather than padding; a region narrower than a chip centres it instead.
        minx, miny, maxx, maxy = self._rasters[r].region.bounds
        x0 = _slide(x0, size, minx, maxx, centre[0])
        y0 = _slide(y0, size, miny, maxy, centre[1])
        return r, Window(int(x0), int(y0), size, size)

    def cut(self, raster: int, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cut one chip (no augmentation) from raster ``raster`` under ``window`` (source pixels, integer).

        Returns:
            ``image`` (C, h, w) float32 normalised with ``spec.mean``/``spec.std`` (0 on nodata, outside the
            raster and outside this split's region); ``masks`` (K, h, w) uint8 of the instances visible in the
            chip (clipped to the region; slivers dropped, see module docstring); ``labels`` (K,) int64;
            ``valid`` (h, w) bool, False where ``image`` was set to 0.
        """
        ras = self._rasters[raster]
        x0, y0, w, h = int(window.col_off), int(window.row_off), int(window.width), int(window.height)
        raw, valid = self._read(raster, x0, y0, w, h)
        shift = Affine.translation(x0, y0)
        inside = rasterio.features.rasterize([(ras.region, 1)], out_shape=(h, w), transform=shift,
                                             dtype=np.uint8).astype(bool) if not ras.region.is_empty else \
            np.zeros((h, w), bool)
        valid &= inside
        mean = np.asarray(self.spec.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.spec.std, np.float32).reshape(-1, 1, 1)
        image = np.where(valid[None], (raw - mean) / std, 0.0).astype(np.float32)
        b = ras.bounds
        near = np.flatnonzero((b[:, 0] < x0 + w) & (b[:, 2] > x0) & (b[:, 1] < y0 + h) & (b[:, 3] > y0))
        masks = np.zeros((len(near), h, w), np.uint8)
        for i, k in enumerate(near):
            masks[i] = rasterio.features.rasterize([(ras.geoms[k], 1)], out_shape=(h, w), transform=shift,
                                                   all_touched=False, dtype=np.uint8)
        masks &= inside[None].astype(np.uint8)
        seen = masks.reshape(len(masks), h * w).sum(1)
        keep = (seen >= 4) & (seen >= MIN_VISIBLE * ras.pixels[near])
        return image, masks[keep], ras.classes[near][keep], valid

    def _read(self, raster: int, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, h, w) float32 raw pixels (0 where invalid) and (h, w) valid mask under a window that may reach
        past the raster's edges (those pixels are invalid)."""
        return self._source(raster).read_window(Window(x0, y0, w, h))

    def band_statistics(self, max_pixels: int = 4_000_000) -> tuple[list[float], list[float]]:
        """Per-band mean and std in raw raster units (complex -> magnitude) over this split's region.

        Valid pixels (not nodata, not non-finite) of the region, read in non-overlapping tiles of ``spec.size``;
        when the region holds more than ``max_pixels``, an evenly spaced subset of the tiles (memory: one tile at
        a time).

        Raises:
            InputError: the region holds no valid pixel.
        """
        s = self.spec.size
        wins = []  # non-overlapping tiles (the :meth:`windows` overlap at the region's edges) over each region
        for r, ras in enumerate(self._rasters):
            if ras.region.is_empty:
                continue
            x0, y0, x1, y1 = ras.region.bounds
            x0, y0, x1, y1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
            boxes = [(x, y, min(s, x1 - x), min(s, y1 - y)) for y in range(y0, y1, s) for x in range(x0, x1, s)]
            tiles = np.array([shapely.box(x, y, x + w, y + h) for x, y, w, h in boxes], dtype=object)
            overlap = shapely.area(shapely.intersection(tiles, ras.region)) > 0
            wins.extend((r, box) for box, ok in zip(boxes, overlap) if ok)
        take = max(1, max_pixels // (s * s))
        if len(wins) > take:
            wins = [wins[i] for i in np.unique(np.linspace(0, len(wins) - 1, take).round().astype(int))]
        stats = BandStatistics()
        for r, (x0, y0, w, h) in wins:
            raw, valid = self._read(r, x0, y0, w, h)
            inside = rasterio.features.rasterize([(self._rasters[r].region, 1)], out_shape=(h, w),
                                                 transform=Affine.translation(x0, y0), dtype=np.uint8)
            stats.add(raw[:, valid & inside.astype(bool)])
        if not stats.count:
            raise InputError(f"{self._rasters[0].path.name}: no valid pixel in the annotated area (all nodata?)")
        return stats.result()

    # -- resources

    def _open(self, path: Path) -> RasterSource:
        # No normalisation (raw values, nodata -> 0 plus a valid mask; chips are normalised with the spec later)
        # and no resampling: labels are rasterised on the source pixels.
        return RasterSource(path, len(self.bands), bands=self.bands, resample=False, label="the training chips")

    def _source(self, raster: int) -> RasterSource:
        """This process's open source of a raster (opened on first use; DataLoader workers open their own)."""
        if self._pid != os.getpid():
            self._sources, self._pid = {}, os.getpid()
        if raster not in self._sources:
            self._sources[raster] = self._open(self._rasters[raster].path)
        return self._sources[raster]

    def _worker_rng(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.rng
        if info.seed != self._rng_key:
            self.rng = np.random.default_rng([self.seed, int(info.seed) % 2**63])
            self._rng_key = int(info.seed)
        return self.rng

    def close(self) -> None:
        """Close the open raster files (they reopen on the next read)."""
        for src in self._sources.values():
            src.close()
        self._sources = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sources"] = {}
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def _slide(start: int, size: int, lo: float, hi: float, centre: float) -> int:
    """Start of a ``size`` window moved into [lo, hi] (it must still contain ``centre``); centred on [lo, hi]
    when that is shorter than the window."""
    if hi - lo <= size:
        return round((lo + hi - size) / 2)
    start = min(max(start, math.floor(lo)), math.ceil(hi) - size)
    return int(min(max(start, math.ceil(centre) - size), math.floor(centre)))


def polygonal_array(geoms: np.ndarray) -> np.ndarray:
    out = np.empty(len(geoms), dtype=object)
    out[:] = [polygonal(g) if g is not None and not g.is_empty else None for g in geoms]
    return out


def _random_point(geom: BaseGeometry, rng: np.random.Generator, tries: int = 16, batch: int = 64) -> np.ndarray:
    """A uniform random point (x, y) inside ``geom`` (rejection sampling in its bounds; a representative point
    when that keeps failing, e.g. for slivers)."""
    x0, y0, x1, y1 = geom.bounds
    for _ in range(tries):
        xs, ys = rng.uniform(x0, x1, batch), rng.uniform(y0, y1, batch)
        hit = np.flatnonzero(shapely.contains_xy(geom, xs, ys))
        if len(hit):
            return np.array([xs[hit[0]], ys[hit[0]]])
    p = geom.representative_point()
    return np.array([p.x, p.y])
