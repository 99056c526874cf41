"""The pipeline: plan -> read -> predict -> merge -> write. One function a caller needs: :func:`segment`.

Raster file -> windows (:mod:`rs_engine.raster`) -> tensors -> model -> masks -> polygons
(:mod:`rs_engine.postprocess`) -> GeoPackage layer ``instances``, written incrementally to a temp file beside
the output and renamed onto it only when the run succeeds.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import torch
from affine import Affine
from pyogrio import raw as ogr_raw
from rasterio.crs import CRS
from rasterio.warp import transform_bounds, transform_geom
from shapely.geometry import mapping, shape

from rs_engine.checkpoint import ModelCard, load_model, read_card
from rs_engine.errors import InputError
from rs_engine.postprocess import MergedObject, TileMerger, as_multipolygon, tile_instances, to_map
from rs_engine.raster import ExtentError, RasterSource, TilePlan

log = logging.getLogger(__name__)

LAYER = "instances"
FIELDS = ["class_id", "class_name", "score", "area", "source", "model", "run_id"]
MIN_TILE_SIZE = 8

#: ``predictor(list of (C, H, W) float32 tensors) -> list of dicts`` (torchvision Mask R-CNN, eval mode).
Predictor = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


class Cancelled(Exception):
    """The run was cancelled (the ``cancel`` event was set); nothing was written. The CLI exits with 130."""


@dataclass
class SegmentOptions:
    """Options of one segmentation run (the CLI's flags). None means "the model card's value"."""

    model: str = "nwpu10"  # bundled model name or path to a .safetensors model file
    device: str = "auto"  # auto | cpu | cuda
    tile_size: int | None = None  # pixels (of the model's grid); None -> card.tile_size
    overlap: int | None = None  # pixels; None -> card.overlap
    score_threshold: float | None = None  # 0-1; None -> card.score_threshold
    bands: list[int] | None = None  # 1-based band indexes (repeats allowed); None -> first card.bands bands
    extent: tuple[float, float, float, float] | None = None  # minx, miny, maxx, maxy in the first input's CRS
    overwrite: bool = False
    batch_size: int = 4  # tiles per forward pass
    resample: bool = True  # resample to card.gsd when the raster's pixel size differs by a factor > 1.5
    simplify: float = 0.0  # polygon simplification tolerance in map units (0 = off)
    mask_threshold: float = 0.5  # mask probability above which a pixel is part of the object
    min_pixels: int = 4  # objects (and mask speckles) smaller than this many model-grid pixels are dropped
    run_id: str | None = None  # None -> a fresh uuid4 hex


@dataclass
class SegmentResult:
    """What a run produced."""

    output: Path
    features: int  # objects written
    tiles: int  # tiles planned over all inputs
    seconds: float  # wall time of the whole run
    skipped_tiles: int = 0  # tiles not predicted because they hold no valid pixel
    run_id: str = ""
    crs: str | None = None  # output CRS as WKT, None without georeferencing


def segment(
    inputs: Sequence[str | Path],
    output: str | Path,
    options: SegmentOptions | None = None,
    predictor: Predictor | None = None,
    card: ModelCard | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> SegmentResult:
    """Segment object instances in rasters and write them as polygons to a GeoPackage.

    Everything a user can get wrong is checked before anything is written. The output layer ``instances``
    holds MultiPolygons in the first input's CRS (other inputs' features are reprojected to it; rasters
    without georeferencing give the pixel frame x = column, y = -row and no CRS) with fields ``class_id``,
    ``class_name``, ``score`` (0-1), ``area`` (CRS units squared), ``source`` (input file name), ``model``
    (card name and version) and ``run_id``. It is written incrementally to ``.NAME.tmp-PID.gpkg`` beside the
    output and renamed onto it only on success; on any error, cancel or interrupt that file is removed and the
    output path is left as it was.

    Args:
        inputs: raster files, segmented one after the other into one layer.
        output: GeoPackage path (``.gpkg``).
        options: run options; None -> defaults.
        predictor: ``predictor(list of (C, T, T) float32 normalised tensors) -> list of dicts`` with ``boxes``
            (K, 4), ``labels`` (K,) 1..num_classes, ``scores`` (K,) and ``masks`` (K, 1, T, T) probabilities,
            i.e. torchvision Mask R-CNN's eval-mode convention; None -> ``load_model(options.model)``.
        card: the model card that goes with ``predictor``; None -> read from ``options.model``.
        progress: called as ``progress(done_tiles, total_tiles)`` from 0 to total.
        cancel: when set, the run stops before the next batch and raises :class:`Cancelled`.

    Raises:
        InputError: bad input file, option, model or output path (message names it).
        Cancelled: ``cancel`` was set.
    """
    start = time.perf_counter()
    options = options or SegmentOptions()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise InputError("no input raster given")
    _check_options(options)
    output = Path(output)
    if card is None:
        card = read_card(options.model)  # the card alone is cheap; weights load after validation
    tile_size = options.tile_size if options.tile_size is not None else card.tile_size
    overlap = options.overlap if options.overlap is not None else card.overlap
    score_threshold = options.score_threshold if options.score_threshold is not None else card.score_threshold
    _check_tiling(tile_size, overlap, score_threshold)

    # One GDAL environment for the whole run, its block cache bounded: the decimated nodata check and the tile
    # reads would otherwise fill GDAL's default cache (5% of RAM) and peak memory would grow with the raster.
    with rasterio.Env(**_gdal_options()):
        sources: list[RasterSource] = []
        try:
            sources = _open_sources(inputs, card, options)
            _check_output(output, options.overwrite, [s.path for s in sources])
            for source in sources:
                source.check_has_data()
            plans = [s.plan(tile_size, overlap) for s in sources]
            if predictor is None:
                predictor, card = load_model(options.model, _resolve_device(options.device))
                # Drop low scores inside the box head, before Mask R-CNN pastes a full-tile mask for each detection
                # (200 x T x T floats per tile otherwise).
                predictor.roi_heads.score_thresh = max(predictor.roi_heads.score_thresh, score_threshold)
            run = _Run(
                sources=sources,
                plans=plans,
                predictor=predictor,
                card=card,
                options=options,
                score_threshold=score_threshold,
                run_id=options.run_id or uuid.uuid4().hex,
                progress=progress,
                cancel=cancel,
            )
            features, skipped = run.write(output)
        finally:
            for source in sources:
                source.close()
    seconds = time.perf_counter() - start
    total = sum(len(p) for p in plans)
    log.info("wrote %d objects from %d tiles to %s in %.1f s", features, total, output, seconds)
    return SegmentResult(output, features, total, seconds, skipped, run.run_id, run.crs_wkt)


# ------------------------------------------------------------------------------------------------ checks


#: GDAL block cache of a run in MB, unless the user sets GDAL_CACHEMAX. It holds a row of 512 px tiles of a 4-band
#: uint16 raster 65536 px wide, so overlaps are read once; a wider row only re-reads overlaps (time, not memory).
#: GDAL's default, 5% of RAM, made peak memory grow with the raster.
GDAL_CACHE_MB = 256


def _gdal_options() -> dict[str, Any]:
    return {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}


def _check_options(options: SegmentOptions) -> None:
    if options.batch_size < 1:
        raise InputError(f"--batch-size {options.batch_size}: must be at least 1")
    if not 0 < options.mask_threshold < 1:
        raise InputError(f"--mask-threshold {options.mask_threshold}: must be between 0 and 1")
    if not (options.simplify >= 0 and math.isfinite(options.simplify)):
        raise InputError(f"--simplify {options.simplify}: must be 0 or a positive distance in map units")
    if options.min_pixels < 1:
        raise InputError(f"--min-pixels {options.min_pixels}: must be at least 1")
    extent = options.extent
    if extent is not None:
        if len(extent) != 4 or not all(math.isfinite(v) for v in extent):
            raise InputError(f"--extent {extent}: needs four numbers MINX,MINY,MAXX,MAXY")
        if not (extent[0] < extent[2] and extent[1] < extent[3]):
            text = ",".join(f"{v:.10g}" for v in extent)
            raise InputError(f"--extent {text}: needs MINX < MAXX and MINY < MAXY")


def _check_tiling(tile_size: int, overlap: int, score_threshold: float) -> None:
    if tile_size < MIN_TILE_SIZE:
        raise InputError(f"--tile-size {tile_size}: must be at least {MIN_TILE_SIZE} pixels")
    if not 0 <= overlap < tile_size:
        raise InputError(f"--overlap {overlap}: must be from 0 to less than the tile size {tile_size}")
    if not 0 <= score_threshold <= 1:
        raise InputError(f"--score-threshold {score_threshold}: must be between 0 and 1")


def _check_output(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """The output must be a .gpkg in an existing writable folder, and not exist unless ``overwrite``."""
    if output.suffix.lower() != ".gpkg":
        raise InputError(f"{output}: output must be a GeoPackage file ending in .gpkg")
    folder = output.absolute().parent
    if not folder.exists():
        raise InputError(f"{output}: output folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(f"{output}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{output}: output folder {folder} is not writable")
    if output.is_dir():
        raise InputError(f"{output}: is a folder, not a file")
    if output.exists():
        if any(p.exists() and os.path.samefile(p, output) for p in inputs):
            raise InputError(f"{output}: output is one of the inputs")
        if not overwrite:
            raise InputError(f"{output}: already exists (use --overwrite to replace it)")


def _open_sources(
    inputs: Sequence[str | Path], card: ModelCard, options: SegmentOptions
) -> list[RasterSource]:
    """Open and validate every input; apply ``--extent`` (given in the first input's CRS).

    With several inputs, one the extent misses is skipped (with a warning); the extent must hit at least one.
    Inputs must all have a CRS or all have none.

    Raises:
        InputError: as :class:`RasterSource`, mixed georeferenced and non-georeferenced inputs, or an extent
            that lies outside every input.
    """
    sources: list[RasterSource] = []
    try:
        for path in inputs:
            sources.append(RasterSource(path, card, options.bands, options.resample))
        first = sources[0]
        for source in sources[1:]:
            if (source.crs is None) != (first.crs is None):
                with_crs, without = (first, source) if source.crs is None else (source, first)
                raise InputError(
                    f"{without.path}: has no CRS but {with_crs.path} has one; segment them in separate runs"
                )
            if source.crs is not None and source.crs != first.crs:
                log.warning("%s: CRS differs from %s; its objects are reprojected", source.name, first.name)
        if options.extent is None:
            return sources
        kept, errors = [], []
        for source in sources:
            extent = options.extent
            if source.crs is not None and source.crs != first.crs:
                extent = transform_bounds(first.crs, source.crs, *extent, densify_pts=21)
            try:
                source.restrict(extent)
                kept.append(source)
            except ExtentError as exc:
                if len(sources) == 1:
                    raise
                errors.append(source)
                log.warning("%s", exc)
        if not kept:
            names = ", ".join(s.name for s in sources)
            text = ",".join(f"{v:.10g}" for v in options.extent)
            raise InputError(f"--extent {text}: lies outside every input ({names})")
        for source in errors:
            source.close()
        return kept
    except BaseException:
        for source in sources:
            source.close()
        raise


def _resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        InputError: unknown device, or CUDA asked for but not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is available (use --device cpu)")
        return torch.device(spec)
    raise InputError(f"--device {spec}: must be auto, cpu or cuda")


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class _Run:
    """One validated run: sources, plans and the predictor, written to one GeoPackage."""

    sources: list[RasterSource]
    plans: list[TilePlan]
    predictor: Predictor
    card: ModelCard
    options: SegmentOptions
    score_threshold: float
    run_id: str
    progress: Callable[[int, int], None] | None
    cancel: threading.Event | None

    @property
    def crs(self) -> CRS | None:
        return self.sources[0].crs

    @property
    def crs_wkt(self) -> str | None:
        return self.crs.to_wkt() if self.crs is not None else None

    def write(self, output: Path) -> tuple[int, int]:
        """Predict every tile and write the objects; returns (features written, tiles skipped)."""
        temp = output.absolute().parent / f".{output.name}.tmp-{os.getpid()}.gpkg"
        writer = _GpkgWriter(temp, self.crs_wkt)
        try:
            writer.create()
            features, skipped = self._predict_all(writer)
            os.replace(temp, output)
        except BaseException:
            # Errors, Cancelled, KeyboardInterrupt (and SIGTERM, which the CLI turns into one): no trace.
            writer.discard()
            raise
        return features, skipped

    def _predict_all(self, writer: _GpkgWriter) -> tuple[int, int]:
        total = sum(len(p) for p in self.plans)
        done = skipped = features = 0
        device = _device_of(self.predictor)
        if self.progress:
            self.progress(0, total)
        for source, plan in zip(self.sources, self.plans, strict=True):
            merger = TileMerger(plan, min_pixels=self.options.min_pixels)
            for batch in _batched(plan.tiles, self.options.batch_size):
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("cancelled")
                reads = [source.read_tile(tile) for tile in batch]
                todo = [i for i, (_, valid) in enumerate(reads) if valid.any()]  # skip all-nodata tiles
                predictions = self._predict([reads[i][0] for i in todo], device)
                by_tile: dict[int, dict[str, Any]] = dict(zip(todo, predictions, strict=True))
                for i, tile in enumerate(batch):
                    instances = []
                    if i in by_tile:
                        instances = tile_instances(
                            by_tile[i],
                            tile,
                            reads[i][1],
                            self.score_threshold,
                            self.options.mask_threshold,
                            self.options.min_pixels,
                        )
                    features += writer.write(self._rows(merger.add(tile, instances), source))
                skipped += len(batch) - len(todo)
                done += len(batch)
                if self.progress:
                    self.progress(done, total)
            features += writer.write(self._rows(merger.finish(), source))
        return features, skipped

    def _predict(self, images: list[np.ndarray], device: torch.device) -> list[dict[str, Any]]:
        if not images:
            return []
        with torch.inference_mode():
            outputs = self.predictor([torch.from_numpy(image).to(device) for image in images])
        if len(outputs) != len(images):
            raise RuntimeError(f"predictor returned {len(outputs)} results for {len(images)} tiles")
        return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()} for out in outputs]

    def _rows(self, objects: list[MergedObject], source: RasterSource) -> list[tuple]:
        """Objects in grid pixels -> rows (WKB MultiPolygon in the output CRS, then the fields in order)."""
        rows = []
        reproject = source.crs is not None and source.crs != self.crs
        names = self.card.class_names
        for obj in objects:
            tolerance = 0.0 if reproject else self.options.simplify  # simplify in output CRS units
            geometry = to_map(obj.geometry, source.grid.transform, tolerance)
            if geometry is not None and reproject:
                geometry = shape(transform_geom(source.crs, self.crs, mapping(geometry)))
                geometry = to_map(shapely.make_valid(geometry), Affine.identity(), self.options.simplify)
            geometry = as_multipolygon(geometry)
            if geometry is None:
                continue
            name = names[obj.class_id - 1] if 1 <= obj.class_id <= len(names) else f"class {obj.class_id}"
            rows.append(
                (
                    shapely.to_wkb(geometry),
                    obj.class_id,
                    name,
                    min(1.0, max(0.0, obj.score)),
                    geometry.area,
                    source.name,
                    self.card.label,
                    self.run_id,
                )
            )
        return rows


def _device_of(predictor: Predictor) -> torch.device:
    """Where the predictor's weights live (CPU for plain callables)."""
    if isinstance(predictor, torch.nn.Module):
        param = next(predictor.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _GpkgWriter:
    """Appends features to the ``instances`` layer of a GeoPackage (pyogrio), batch by batch."""

    def __init__(self, path: Path, crs_wkt: str | None) -> None:
        self.path = path
        self.crs_wkt = crs_wkt

    def _write(self, rows: list[tuple], append: bool) -> None:
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(len(FIELDS) + 1)]
        dtypes = [np.int32, object, np.float64, np.float64, object, object, object]
        field_data = [np.asarray(col, dtype=dtype) for col, dtype in zip(columns[1:], dtypes, strict=True)]
        with warnings.catch_warnings():
            # No CRS is intended for rasters without georeferencing (QGIS pixel frame).
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            ogr_raw.write(
                str(self.path),
                geometry=np.asarray(columns[0], dtype=object),
                field_data=field_data,
                fields=FIELDS,
                layer=LAYER,
                driver="GPKG",
                geometry_type="MultiPolygon",
                crs=self.crs_wkt,
                append=append,
            )

    def create(self) -> None:
        """Create the file with an empty layer (schema and CRS), so a run with no objects still gives one."""
        self.discard()  # a stale temp file of a crashed run with the same process id
        self._write([], append=False)

    def write(self, rows: list[tuple]) -> int:
        if rows:
            self._write(rows, append=True)
        return len(rows)

    def discard(self) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
