"""The pipeline: plan -> read -> predict -> merge -> write. One function a caller needs: :func:`segment`.

Raster file -> windows (:mod:`rs_engine.raster`) -> tensors -> model -> masks -> polygons
(:mod:`rs_engine.postprocess`) -> GeoPackage layer ``instances``, written incrementally to a temp file beside
the output and renamed onto it only when the run succeeds. Prediction runs here (:func:`predict_tiles`, batch by
batch) or on the blocks of a Dask cluster (:mod:`rs_engine.distributed`); merging and writing always run here, in
plan order, so both give the same features.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape

from rs_engine.card import ModelCard, read_card
from rs_engine.errors import Cancelled, InputError
from rs_engine.gpkg import FIELDS, LAYER, GpkgWriter, atomic_layer, check_output
from rs_engine.inputs import expand_inputs, open_sources, output_crs
from rs_engine.postprocess import MergedObject, TileMerger, as_multipolygon, to_map
from rs_engine.predict import Predictor, TileBatch, limit_malloc_arenas, local_batches, predict_tiles, stream_plan
from rs_engine.raster import RasterSource, check_extent
from rs_engine.runtime import choose_runtime, load_predictor, model_file, torch_available
from rs_engine.tiling import TilePlan

log = logging.getLogger(__name__)

__all__ = [
    "FIELDS", "LAYER", "Cancelled", "Predictor", "SegmentOptions", "SegmentResult", "TileBatch", "predict_tiles",
    "segment",
]

MIN_TILE_SIZE = 8

@dataclass
class SegmentOptions:
    """Options of one segmentation run (the CLI's flags). None means "the model card's value"."""

    model: str = "nwpu10"  # bundled model name, or path to a .safetensors (PyTorch) or .onnx model file
    device: str = "auto"  # auto | cpu | cuda | cuda:N (rs_engine.device)
    runtime: str = "auto"  # auto | torch | onnx | openvino (rs_engine.runtime.choose_runtime: auto is openvino on
    # the CPU where installed for bundled models and .onnx files, else onnx for .onnx or without PyTorch, else torch)
    threads: int | None = None  # CPU threads of the runtime, all streams together; None: OMP_NUM_THREADS or all cores
    streams: int | None = None  # batches predicted at once, in threads of this process; None: auto (CPU: one per
    # thread, at most 4, each with threads // streams runtime threads; CUDA or a caller's predictor: 1)
    tile_size: int | None = None  # pixels (of the model's grid); None -> card.tile_size
    overlap: int | None = None  # pixels; None -> card.overlap
    score_threshold: float | None = None  # 0-1; None -> card.score_threshold
    bands: list[int] | None = None  # 1-based band indexes (repeats allowed); None -> first card.bands bands, or
    # band 1 repeated for a 1-band raster and a multi-band model (with a notice)
    extent: tuple[float, float, float, float] | None = None  # minx, miny, maxx, maxy in the first input's CRS
    overwrite: bool = False
    batch_size: int = 4  # tiles per forward pass
    resample: bool = True  # resample to card.gsd when the raster's pixel size differs by a factor > 1.5
    simplify: float = 0.0  # polygon simplification tolerance in map units (0 = off)
    mask_threshold: float = 0.5  # mask probability above which a pixel is part of the object
    min_pixels: int = 4  # objects (and mask speckles) smaller than this many model-grid pixels are dropped
    run_id: str | None = None  # None -> a fresh uuid4 hex
    crs: str | None = None  # output CRS (EPSG:32616, WKT, PROJ); None -> the first input's CRS
    scheduler: str | None = None  # None: this process; "local:N" or "tcp://HOST:PORT": a Dask cluster
    block_tiles: int = 64  # tiles per cluster block (a scene with fewer tiles is one block)


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
    runtime: str | None = None  # the runtime that predicted (torch, onnx, openvino); None: a caller's predictor
    precision: str | None = None  # the runtime's inference precision where it reports one (OpenVINO: f32, bf16, int8)
    scan: str | None = None  # how OpenVINO ran the selective scans: fused (the C kernel) or graph (exported operators)


def segment(
    inputs: Sequence[str | Path],
    output: str | Path,
    options: SegmentOptions | None = None,
    predictor: Predictor | None = None,
    card: ModelCard | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    on_cluster: Callable[[str | None, int], None] | None = None,
) -> SegmentResult:
    """Segment object instances in rasters and write them as polygons to a GeoPackage.

    Everything a user can get wrong is checked, on every input, before the model is loaded or a cluster is
    started. The output layer ``instances`` holds MultiPolygons in ``options.crs`` or else the first input's
    CRS (other inputs' features are reprojected to it; rasters
    without georeferencing give the pixel frame x = column, y = -row and no CRS) with fields ``class_id``,
    ``class_name``, ``score`` (0-1), ``area`` (CRS units squared), ``source`` (input file name), ``model``
    (card name and version) and ``run_id``. It is written incrementally to ``.NAME.tmp-PID.gpkg`` beside the
    output and renamed onto it only on success; on any error, cancel or interrupt that file is removed and the
    output path is left as it was.

    With ``options.scheduler`` the tiles are predicted on a Dask cluster (:mod:`rs_engine.distributed`) and merged
    here in plan order, so the features equal those of a run in this process.

    Args:
        inputs: raster files, folders of rasters, glob patterns or VRT mosaics (:func:`expand_inputs`),
            segmented one after the other into one layer.
        output: GeoPackage path (``.gpkg``).
        options: run options; None -> defaults.
        predictor: ``predictor(list of (C, T, T) float32 normalised arrays) -> list of dicts`` with ``boxes``
            (K, 4), ``labels`` (K,) 1..num_classes, ``scores`` (K,) and ``masks`` (K, 1, T, T) probabilities
            (arrays or tensors), i.e. torchvision Mask R-CNN's eval-mode convention; None ->
            :func:`rs_engine.runtime.load_predictor` of ``options.model`` in ``options.runtime``.
        card: the model card that goes with ``predictor``; None -> read from ``options.model``.
        progress: called as ``progress(done_tiles, total_tiles)`` from 0 to total (counted in tiles across
            all workers on a cluster, block by block).
        cancel: when set, the run stops before the next batch (the cluster's work is cancelled) and raises
            :class:`Cancelled`.
        on_cluster: with ``options.scheduler``, called once connected as ``on_cluster(dashboard address or
            None, worker threads)``.

    Raises:
        InputError: bad input file, option, model or output path (message names it).
        Cancelled: ``cancel`` was set.
    """
    start = time.perf_counter()
    limit_malloc_arenas()  # before the runtime's threads exist: peak RSS stays flat over long runs
    options = options or SegmentOptions()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = expand_inputs(inputs)
    if not inputs:
        raise InputError("no input raster given")
    _check_options(options)
    output = Path(output)
    runtime = None
    if card is None:
        runtime = choose_runtime(options.model, options.runtime, options.device)
        card = read_card(model_file(options.model, runtime))  # the card alone is cheap; weights load later
        if options.runtime == "auto" and runtime == "openvino" and not _fits_export(card, options) \
                and torch_available() and not str(options.model).lower().endswith(".onnx"):
            runtime = "torch"  # a bundled model whose exported graph fixes another tile size or a higher floor
            card = read_card(model_file(options.model, runtime))
            options = replace(options, runtime=runtime)  # cluster workers too
    tile_size = options.tile_size if options.tile_size is not None else card.tile_size
    exported = card.provenance.get("onnx", {}).get("tile_size") if runtime in ("onnx", "openvino") else None
    if exported and tile_size != exported:
        raise InputError(f"{options.model}: this ONNX model was exported for {exported} px tiles, not {tile_size} "
                         f"(rs-engine export --tile-size {tile_size} makes one)")
    overlap = options.overlap if options.overlap is not None else card.overlap
    score_threshold = options.score_threshold if options.score_threshold is not None else card.score_threshold
    _check_tiling(tile_size, overlap, score_threshold)
    scheduler = None
    # What predicted, for the run's report: the loaded runtime's name and precision, unknown for a caller's
    # predictor; on a cluster the chosen runtime (each worker loads its own).
    ran, precision, scan = (runtime, None, None) if predictor is None else (None, None, None)
    if options.scheduler is not None:
        from rs_engine import distributed  # Dask is an extra: imported only when asked for

        scheduler = distributed.parse_scheduler(options.scheduler)

    # One GDAL environment for the whole run, its block cache bounded: the decimated nodata check and the tile
    # reads would otherwise fill GDAL's default cache (5% of RAM) and peak memory would grow with the raster.
    with rasterio.Env(**gdal_options()):
        sources: list[RasterSource] = []
        try:
            sources = open_sources(inputs, card, options.bands, options.resample, options.extent)
            crs = output_crs(options.crs, sources)
            check_output(output, options.overwrite, [s.path for s in sources])
            for source in sources:
                source.check_has_data()
            plans = [s.plan(tile_size, overlap) for s in sources]
            run = _Run(sources, plans, card, crs, options, options.run_id or uuid.uuid4().hex, progress)
            # Every check is done: only now are the model loaded or the cluster started.
            if scheduler is None:
                streams = options.streams or 1  # a caller's predictor may not be thread-safe
                if predictor is None:
                    streams, threads = stream_plan(options.threads, options.streams, options.device)
                    loaded, card = load_predictor(options.model, runtime, options.device, threads, streams)
                    run.card, ran = card, getattr(loaded, "runtime", runtime)
                    precision, scan = getattr(loaded, "precision", None), getattr(loaded, "scan", None)
                    # Drop low scores inside the box head, before Mask R-CNN pastes a full-tile mask for each
                    # detection (200 x T x T floats per tile otherwise).
                    loaded.set_score_threshold(score_threshold)
                    predictor = loaded
                    if getattr(loaded, "on_gpu", False):
                        streams = 1
                batches = local_batches(sources, plans, predictor, score_threshold, options, cancel, streams)
                with contextlib.closing(batches):
                    features, skipped = run.write(output, batches)
            else:
                with distributed.connect(scheduler, on_cluster) as client:
                    batches = distributed.block_batches(
                        client, sources, plans, predictor, score_threshold, options, run.run_id, cancel
                    )
                    with contextlib.closing(batches):  # cancels the blocks still out on any error
                        features, skipped = run.write(output, batches)
        finally:
            for source in sources:
                source.close()
    seconds = time.perf_counter() - start
    total = sum(len(p) for p in plans)
    log.info("wrote %d objects from %d tiles to %s in %.1f s", features, total, output, seconds)
    return SegmentResult(output, features, total, seconds, skipped, run.run_id, run.crs_wkt, ran, precision,
                         scan)


# ------------------------------------------------------------------------------------------------ checks


def _fits_export(card: ModelCard, options: SegmentOptions) -> bool:
    """Whether an exported graph (its card's ``provenance["onnx"]``) serves these options: the same tile size and
    a score threshold at or above the floor the graph applies."""
    onnx = card.provenance.get("onnx", {})
    tile_ok = options.tile_size is None or options.tile_size == onnx.get("tile_size", card.tile_size)
    floor = onnx.get("min_score", card.score_threshold)
    return tile_ok and (options.score_threshold is None or options.score_threshold >= floor)


#: GDAL block cache of a run in MB, unless the user sets GDAL_CACHEMAX. It holds a row of 512 px tiles of a 4-band
#: uint16 raster 65536 px wide, so overlaps are read once; a wider row only re-reads overlaps (time, not memory).
#: GDAL's default, 5% of RAM, made peak memory grow with the raster.
GDAL_CACHE_MB = 256


def gdal_options() -> dict[str, Any]:
    """The GDAL settings of a run (``rasterio.Env(**gdal_options())``): a bounded block cache."""
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
    if options.block_tiles < 1:
        raise InputError(f"--block-tiles {options.block_tiles}: must be at least 1")
    if options.extent is not None:
        check_extent(options.extent)


def _check_tiling(tile_size: int, overlap: int, score_threshold: float) -> None:
    if tile_size < MIN_TILE_SIZE:
        raise InputError(f"--tile-size {tile_size}: must be at least {MIN_TILE_SIZE} pixels")
    if not 0 <= overlap < tile_size:
        raise InputError(f"--overlap {overlap}: must be from 0 to less than the tile size {tile_size}")
    if not 0 <= score_threshold <= 1:
        raise InputError(f"--score-threshold {score_threshold}: must be between 0 and 1")


# ------------------------------------------------------------------------------------------------ the run


class _Run:
    """One validated run: merges predicted tile batches in plan order and writes them to one GeoPackage."""

    def __init__(
        self,
        sources: list[RasterSource],
        plans: list[TilePlan],
        card: ModelCard,
        crs: CRS | None,
        options: SegmentOptions,
        run_id: str,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.sources, self.plans, self.card, self.crs = sources, plans, card, crs
        self.options, self.run_id, self.progress = options, run_id, progress

    @property
    def crs_wkt(self) -> str | None:
        return self.crs.to_wkt() if self.crs is not None else None

    def write(self, output: Path, batches: Iterator[TileBatch]) -> tuple[int, int]:
        """Merge and write every batch; returns (features written, tiles skipped).

        Raises:
            InputError: the file system refused a write (disk full, quota, read-only, the folder removed): one
                line naming the folder and the cause; ``output`` is left as it was and the temporary file removed
                (on a file system turned read-only mid-run it cannot be: the message names it).
        """
        with atomic_layer(output, self.crs_wkt) as writer:
            features, skipped = self._merge_all(batches, writer)
        return features, skipped

    def _merge_all(self, batches: Iterator[TileBatch], writer: GpkgWriter) -> tuple[int, int]:
        total = sum(len(p) for p in self.plans)
        done = skipped = features = 0
        merger, current = None, -1
        if self.progress:
            self.progress(0, total)
        for batch in batches:
            if batch.source != current:
                if merger is not None:
                    features += writer.write(self._rows(merger.finish(), self.sources[current]))
                current = batch.source
                merger = TileMerger(self.plans[current], min_pixels=self.options.min_pixels)
            source = self.sources[current]
            for tile, instances in zip(batch.tiles, batch.instances, strict=True):
                features += writer.write(self._rows(merger.add(tile, instances), source))
            skipped += batch.skipped
            done += len(batch.tiles)
            if self.progress:
                self.progress(done, total)
        if done != total:
            raise RuntimeError(f"{done} of {total} tiles were predicted")
        if merger is not None:
            features += writer.write(self._rows(merger.finish(), self.sources[current]))
        return features, skipped

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


