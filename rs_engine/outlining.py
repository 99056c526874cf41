"""Prompted outlining: a point or a box on a raster in, the object's polygon out (``rs-engine outline`` and
``rs-engine serve``).

:class:`Outliner` holds a loaded model (its prompter: :mod:`rs_engine.models.prompter`), the rasters it has
opened and the embeddings of the last windows it computed, so a further prompt in the same window costs only the
model's heads. A prompt is read in the raster's grid (resampled to the model's GSD, as ``segment`` reads it) in a
window of the model's tile size around it (larger for a larger box); the mask is cut to the valid pixels, to the
part that holds the points (a point prompt), and vectorised in the raster's CRS.
:func:`outline` runs a file of prompts and writes one polygon per prompt into a GeoPackage, checked and written
as ``segment`` writes (one-line errors, exit code 2, nothing half-written).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from shapely.geometry.base import BaseGeometry

from rs_engine.card import ModelCard, read_card
from rs_engine.errors import InputError
from rs_engine.gpkg import atomic_layer, check_output
from rs_engine.inputs import model_source
from rs_engine.pipeline import gdal_options
from rs_engine.postprocess import as_multipolygon, mask_to_geometry, to_map
from rs_engine.prompts import Prompt, read_prompts
from rs_engine.raster import RasterSource
from rs_engine.runtime import model_file, torch_available

LAYER = "outlines"
FIELDS: dict[str, type] = {"prompt_id": np.int64, "class_id": np.int32, "class_name": object,
                           "score": np.float64, "model": object, "run_id": object}  # fmt: skip
#: Context around a point prompt that a cached window must hold (grid pixels), else a new window is embedded.
POINT_MARGIN = 96
#: Context around a box prompt (grid pixels).
BOX_MARGIN = 32
#: Largest window side (grid pixels): a box prompt larger than this is refused.
MAX_WINDOW = 2048
#: Embeddings kept (least recently used dropped first).
CACHE_WINDOWS = 4
MASK_THRESHOLD = 0.5
MIN_PIXELS = 4
_IDENTITY = rasterio.Affine.identity()  # outlines are in map units already when they are simplified


@dataclass
class OutlineOptions:
    """Options of an ``outline`` run (the CLI's flags)."""

    model: str = "nwpu10"  # bundled model name or .safetensors file
    device: str = "auto"
    threads: int | None = None
    bands: list[int] | None = None
    resample: bool = True
    simplify: float = 0.0  # map units
    overwrite: bool = False
    run_id: str | None = None


@dataclass
class OutlineResult:
    """One prompt's answer: ``geometry`` in the raster's CRS (None: nothing found), ``score`` 0-1, ``class_id``
    1..n (0 when nothing was found), ``embedded``: a new window was computed for it; ``seconds``: wall time."""

    geometry: BaseGeometry | None
    score: float
    class_id: int
    class_name: str
    embedded: bool
    seconds: float


class Outliner:
    """A model loaded for prompts, with its open rasters and window cache (one per ``serve`` process).

    Args:
        model: bundled model name or .safetensors file (the prompter needs PyTorch).
        device: ``auto``, ``cpu``, ``cuda``.
        threads: CPU threads; None: PyTorch's default.

    Raises:
        InputError: PyTorch missing, unknown or corrupt model.
    """

    def __init__(self, model: str = "nwpu10", device: str = "auto", threads: int | None = None) -> None:
        path = _torch_model(model)
        import torch

        from rs_engine.checkpoint import load_model
        from rs_engine.device import resolve_device
        from rs_engine.models.fuse import fold_batchnorm
        from rs_engine.models.prompter import prompter_for

        if threads:
            torch.set_num_threads(threads)
        net, self.card = load_model(path, resolve_device(device))
        fold_batchnorm(net)
        self.prompter = prompter_for(net)  # the model's prompt head if it has one, else its Mask R-CNN heads
        self._sources: dict[tuple[str, tuple[int, ...] | None], RasterSource] = {}
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    def source(self, path: str | Path, bands: list[int] | None = None, resample: bool = True) -> RasterSource:
        """The raster opened for this model (kept open; checked once).

        Raises:
            InputError: as :class:`RasterSource`, or a raster without a valid pixel.
        """
        key = (str(Path(path).absolute()), tuple(bands) if bands else None, resample)
        if key not in self._sources:
            src = model_source(path, self.card, bands, resample)
            try:
                src.check_has_data()
            except BaseException:
                src.close()
                raise
            self._sources[key] = src
        return self._sources[key]

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()
        self._cache.clear()

    def run(self, source: RasterSource, prompt: Prompt) -> OutlineResult:
        """Outline the object of one prompt (coordinates in the raster's CRS; its pixel frame without one).

        Raises:
            InputError: the prompt lies outside the raster, or a box larger than :data:`MAX_WINDOW` grid pixels.
        """
        start = time.perf_counter()
        lo, hi = grid_extent(source, prompt)
        margin = POINT_MARGIN if prompt.box is None else BOX_MARGIN
        (x0, y0), (emb, valid), embedded = self._window(source, lo - margin, hi + margin, prompt.id)
        offset = np.array([x0, y0], dtype=np.float32)
        if prompt.box is None:
            out = self.prompter.point(emb, prompt_points(source, prompt) - offset)
        else:
            out = self.prompter.box(emb, np.concatenate([lo, hi]) - np.concatenate([offset, offset]))
        geometry = None
        if out is not None:
            h, w = emb.size
            mask = (out.mask > MASK_THRESHOLD) & valid[:h, :w]
            grid_geom = mask_to_geometry(mask, x0, y0, MIN_PIXELS)
            geometry = to_map(grid_geom, source.grid.transform) if grid_geom is not None else None
        seconds = time.perf_counter() - start
        if geometry is None:
            return OutlineResult(None, 0.0, 0, "", embedded, seconds)
        names = self.card.class_names
        name = names[out.label - 1] if 1 <= out.label <= len(names) else f"class {out.label}"
        return OutlineResult(geometry, out.score, out.label, name, embedded, seconds)

    def embed(self, source: RasterSource, prompt: Prompt) -> bool:
        """Compute (or find cached) the window a prompt would use; True when it was computed now."""
        lo, hi = grid_extent(source, prompt)
        margin = POINT_MARGIN if prompt.box is None else BOX_MARGIN
        return self._window(source, lo - margin, hi + margin, prompt.id)[2]

    def _window(self, source: RasterSource, lo: np.ndarray, hi: np.ndarray, prompt_id: Any
                ) -> tuple[tuple[int, int], tuple[Any, np.ndarray], bool]:
        """A cached window holding [lo, hi] (clipped to the grid), else a new one embedded around it; returns
        its grid offset (x0, y0), (embedding, valid pixels) and whether it was computed now."""
        gw, gh = source.grid.width, source.grid.height
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, [gw, gh])
        for key in list(self._cache):
            if key[0] is source:
                x0, y0, size = key[1]
                if x0 <= lo[0] and y0 <= lo[1] and hi[0] <= min(x0 + size, gw) and hi[1] <= min(y0 + size, gh):
                    self._cache.move_to_end(key)
                    return (x0, y0), self._cache[key], False
        need = float(max(hi - lo))
        size = max(self.card.tile_size, 32 * math.ceil(need / 32))
        if size > MAX_WINDOW:
            raise InputError(f"prompt {prompt_id}: its box spans {need:.0f} px at the model's grid; at most "
                             f"{MAX_WINDOW - 2 * BOX_MARGIN} px can be outlined at once")
        centre = (lo + hi) / 2
        x0 = int(min(max(round(centre[0] - size / 2), 0), max(gw - size, 0)))
        y0 = int(min(max(round(centre[1] - size / 2), 0), max(gh - size, 0)))
        image, valid = source.read_grid(x0, y0, size)
        h, w = min(size, gh - y0), min(size, gw - x0)
        emb = self.prompter.embed(image[:, :h, :w])
        key = (source, (x0, y0, size))
        self._cache[key] = (emb, valid)
        while len(self._cache) > CACHE_WINDOWS:
            self._cache.popitem(last=False)
        return (x0, y0), (emb, valid), True


def _torch_model(model: str) -> Path:
    if not torch_available():
        raise InputError("outlining needs PyTorch: pip install 'delineate[torch]' (the ONNX engine cannot prompt)")
    return model_file(model, "torch")


def grid_extent(source: RasterSource, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): a prompt's extent in grid pixels (x, y), the box clipped to the grid.

    Raises:
        InputError: a point outside the raster, or a box that misses it.
    """
    gw, gh = source.grid.width, source.grid.height
    if prompt.box is None:
        pts = prompt_points(source, prompt)
        if (pts < 0).any() or (pts[:, 0] >= gw).any() or (pts[:, 1] >= gh).any():
            raise InputError(f"prompt {prompt.id}: the point lies outside the raster {source.name}")
        return pts.min(0), pts.max(0)
    inv = ~source.grid.transform
    minx, miny, maxx, maxy = prompt.box
    corners = np.array([inv * (x, y) for x in (minx, maxx) for y in (miny, maxy)], dtype=np.float64)
    lo, hi = corners.min(0), corners.max(0)
    if hi[0] <= 0 or hi[1] <= 0 or lo[0] >= gw or lo[1] >= gh:
        raise InputError(f"prompt {prompt.id}: the box lies outside the raster {source.name}")
    lo, hi = np.maximum(lo, 0), np.minimum(hi, [gw, gh])
    if (hi - lo < 1).any():
        raise InputError(f"prompt {prompt.id}: the box is less than one pixel wide on the raster {source.name}")
    return lo.astype(np.float32), hi.astype(np.float32)


def prompt_points(source: RasterSource, prompt: Prompt) -> np.ndarray:
    """A point prompt's points (P, 2) in grid pixels (x, y)."""
    inv = ~source.grid.transform
    return np.array([inv * (float(x), float(y)) for x, y in prompt.points], dtype=np.float32)


def outline(input: str | Path, output: str | Path, prompts: str | Path,
            options: OutlineOptions | None = None) -> tuple[Path, int, int, float]:
    """Outline one object per prompt of a vector file and write the polygons to a GeoPackage.

    The output layer ``outlines`` holds one MultiPolygon per prompt (a prompt that finds nothing gets an empty
    geometry and score 0), in the raster's CRS, with fields ``prompt_id`` (the prompt's feature id),
    ``class_id``, ``class_name``, ``score`` (0-1, :mod:`rs_engine.models.prompter`), ``model`` and ``run_id``.
    Everything a user can get wrong is checked before the model is loaded; the file is written beside the
    output and renamed onto it only on success.

    Args:
        input: raster file.
        output: GeoPackage path.
        prompts: vector file of points (one object each; a MultiPoint: several points of one object) and/or
            polygons (their bounding boxes are the box prompts), in any CRS (reprojected to the raster's; a file
            without CRS is taken to be in the raster's).

    Returns:
        (output path, prompts, prompts that found an object, seconds).

    Raises:
        InputError: bad raster, prompts, model or output path (one line naming it).
    """
    start = time.perf_counter()
    options = options or OutlineOptions()
    output = Path(output)
    card: ModelCard = read_card(_torch_model(options.model))
    with rasterio.Env(**gdal_options()), model_source(input, card, options.bands, options.resample) as source:
        check_output(output, options.overwrite, [source.path, Path(prompts)])
        source.check_has_data()
        items = read_prompts(prompts, source.crs)
        for p in items:
            grid_extent(source, p)  # every prompt inside the raster before the model loads
        outliner = Outliner(options.model, options.device, options.threads)
        run_id = options.run_id or uuid.uuid4().hex
        crs_wkt = source.crs.to_wkt() if isinstance(source.crs, CRS) else None
        found = 0
        with atomic_layer(output, crs_wkt, LAYER, FIELDS) as writer:
            for p in items:
                r = outliner.run(source, p)
                geom = as_multipolygon(to_map(r.geometry, _IDENTITY, options.simplify)) if r.geometry else None
                found += geom is not None
                writer.write([(shapely.to_wkb(geom) if geom is not None else None, p.id, r.class_id, r.class_name,
                               min(1.0, max(0.0, r.score)), card.label, run_id)])  # fmt: skip
    return output, len(items), found, time.perf_counter() - start

