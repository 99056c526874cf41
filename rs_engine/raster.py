"""Open a raster, plan tiles (windows with overlap), read and normalise a window.

Everything here works window by window: no function reads a whole raster, so memory does not grow with the
raster's size. Pixels are addressed in three frames:

- *source* pixels: the raster file's own pixel grid (rasterio windows);
- *grid* pixels: the grid the model sees, i.e. the source window of interest (``--extent``) resampled to the
  model's GSD when the raster's differs by more than a factor (:class:`Grid`); identical to source pixels
  when no resampling is needed;
- *map* coordinates: the raster's CRS units, via :attr:`Grid.transform`. A raster without georeferencing
  gets the pixel frame QGIS uses for such rasters (x = column, y = -row) and no CRS.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.warp
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError
from rasterio.transform import from_gcps
from rasterio.windows import Window

from rs_engine.checkpoint import ModelCard
from rs_engine.errors import InputError

log = logging.getLogger(__name__)

#: Transform of rasters without georeferencing: the pixel frame QGIS uses (x = column, y = -row).
PIXEL_FRAME = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
#: Resample to the model GSD when the raster's pixel size differs from it by more than this factor.
RESAMPLE_FACTOR = 1.5
#: Mean Earth radius (m), for approximate metres per degree of geographic CRSs.
EARTH_RADIUS_M = 6_371_008.8
#: Longest side (px) of the decimated read that checks a raster is not entirely nodata.
NODATA_CHECK_SIZE = 512
#: Side (px) of the windows of the exhaustive nodata scan (only when the decimated check finds no data).
NODATA_SCAN_BLOCK = 2048

SUPPORTED_DTYPES = frozenset(
    "uint8 int8 uint16 int16 uint32 int32 float32 float64 complex64 complex128".split()
)


class ExtentError(InputError):
    """``--extent`` is malformed or lies outside a raster (an :class:`InputError`)."""


# ----------------------------------------------------------------------------------------------- tile plan


@dataclass(frozen=True)
class Tile:
    """One square window of the grid fed to the model.

    Attributes:
        index: position in the plan (row-major).
        row, col: position in the tile grid.
        x0, y0: top-left corner in grid pixels.
        size: side in grid pixels (the window may reach past the grid's right/bottom edge only when the grid
            is smaller than a tile; those pixels are padding).
        core: ``(x0, y0, x1, y1)`` half-open grid-pixel box this tile is responsible for; the cores of a plan
            partition the grid (each overlap is split down its middle).
        interior: ``(left, top, right, bottom)``: True where the tile edge is shared with a neighbouring tile
            (an object reaching it may continue beyond), False where it is the grid's edge.
    """

    index: int
    row: int
    col: int
    x0: int
    y0: int
    size: int
    core: tuple[int, int, int, int]
    interior: tuple[bool, bool, bool, bool]

    @property
    def window(self) -> Window:
        """The tile as a rasterio window in grid pixels (``size`` x ``size``)."""
        return Window(self.x0, self.y0, self.size, self.size)


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a ``width`` x ``height`` grid, in row-major order."""

    width: int
    height: int
    tile_size: int
    overlap: int
    col_offsets: tuple[int, ...]
    row_offsets: tuple[int, ...]
    tiles: tuple[Tile, ...]

    @property
    def n_rows(self) -> int:
        return len(self.row_offsets)

    @property
    def n_cols(self) -> int:
        return len(self.col_offsets)

    def __len__(self) -> int:
        return len(self.tiles)


def plan_offsets(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets (pixels) of tiles along one axis of ``length`` pixels.

    Tiles advance by ``tile_size - overlap``; the last tile is shifted back so it ends at the grid's edge
    (its overlap with the previous one grows) rather than being padded. An axis shorter than a tile gets one
    tile at 0 (padded by the reader).
    """
    stride = tile_size - overlap
    offsets = [0]
    while offsets[-1] + tile_size < length:
        offsets.append(min(offsets[-1] + stride, length - tile_size))
    return offsets


def _core_bounds(offsets: Sequence[int], length: int, tile_size: int) -> list[tuple[int, int]]:
    """Split each overlap down its middle so the cores partition ``[0, length)``."""
    cuts = [(offsets[i + 1] + offsets[i] + tile_size) // 2 for i in range(len(offsets) - 1)]
    starts = [0, *cuts]
    ends = [*cuts, length]
    return list(zip(starts, ends, strict=True))


def plan_tiles(width: int, height: int, tile_size: int, overlap: int) -> TilePlan:
    """Plan square tiles of ``tile_size`` px overlapping by ``overlap`` px over a ``width`` x ``height`` grid.

    Raises:
        ValueError: ``tile_size < 1``, ``overlap < 0`` or ``overlap >= tile_size`` (callers validate options
            first and raise :class:`InputError`).
    """
    if tile_size < 1 or overlap < 0 or overlap >= tile_size:
        raise ValueError(f"bad tile plan: tile_size={tile_size}, overlap={overlap}")
    cols = plan_offsets(width, tile_size, overlap)
    rows = plan_offsets(height, tile_size, overlap)
    col_cores = _core_bounds(cols, width, tile_size)
    row_cores = _core_bounds(rows, height, tile_size)
    tiles = []
    for r, (y0, (cy0, cy1)) in enumerate(zip(rows, row_cores, strict=True)):
        for c, (x0, (cx0, cx1)) in enumerate(zip(cols, col_cores, strict=True)):
            interior = (c > 0, r > 0, c < len(cols) - 1, r < len(rows) - 1)
            tiles.append(Tile(len(tiles), r, c, x0, y0, tile_size, (cx0, cy0, cx1, cy1), interior))
    return TilePlan(width, height, tile_size, overlap, tuple(cols), tuple(rows), tuple(tiles))


# ------------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """The pixel grid the model sees: a source window, resampled to the model's GSD where needed.

    Attributes:
        window: the source pixels covered (integer offsets and sizes, clipped to the raster).
        width, height: grid size in grid pixels.
        transform: grid pixel (col, row) -> map coordinates (x, y).
    """

    window: Window
    width: int
    height: int
    transform: Affine

    @property
    def scale(self) -> tuple[float, float]:
        """Source pixels per grid pixel along x and y (1, 1 when not resampled)."""
        return self.window.width / self.width, self.window.height / self.height

    @property
    def resampled(self) -> bool:
        return (self.width, self.height) != (self.window.width, self.window.height)

    def source_window(self, x0: int, y0: int, width: int, height: int) -> Window:
        """Source window (fractional offsets where resampled) under a ``width`` x ``height`` grid window."""
        sx, sy = self.scale
        return Window(self.window.col_off + x0 * sx, self.window.row_off + y0 * sy, width * sx, height * sy)


def make_grid(window: Window, transform: Affine, scale: tuple[float, float] = (1.0, 1.0)) -> Grid:
    """Grid over a source ``window`` with ``scale`` grid pixels per source pixel (x, y)."""
    width = max(1, round(window.width * scale[0]))
    height = max(1, round(window.height * scale[1]))
    grid_transform = (
        transform
        * Affine.translation(window.col_off, window.row_off)
        * Affine.scale(window.width / width, window.height / height)
    )
    return Grid(window, width, height, grid_transform)


def pixel_size_m(crs: CRS | None, transform: Affine, width: int, height: int) -> tuple[float, float] | None:
    """Ground size of a pixel along its columns and rows, in metres; None when it can't be known.

    Projected CRS: pixel size in CRS linear units times the unit's metre factor. Geographic CRS: degrees
    converted to metres at the raster's centre on a sphere of the mean Earth radius (approximate, good to a
    fraction of a percent, which is plenty for choosing a resampling factor). No CRS or another kind of CRS
    (engineering, local): None.
    """
    if crs is None:
        return None
    col_vec = (transform.a, transform.d)  # map displacement of one pixel step along a row (x direction)
    row_vec = (transform.b, transform.e)
    try:
        if crs.is_projected:
            factor = crs.linear_units_factor[1]
            return math.hypot(*col_vec) * factor, math.hypot(*row_vec) * factor
        if crs.is_geographic:
            _, lat = transform * (width / 2, height / 2)
            coslat = math.cos(math.radians(max(-89.9, min(89.9, lat))))
            per_degree = EARTH_RADIUS_M * math.pi / 180

            def metres(vec: tuple[float, float]) -> float:
                return math.hypot(vec[0] * coslat, vec[1]) * per_degree

            return metres(col_vec), metres(row_vec)
    except CRSError:
        return None
    return None


def extent_window(extent: Sequence[float], transform: Affine, width: int, height: int, name: str) -> Window:
    """Source window (integer, clipped to the raster) covering ``extent`` = (minx, miny, maxx, maxy).

    Works for rotated transforms (the window covers the extent's four corners).

    Raises:
        ExtentError: the extent is malformed or doesn't overlap the raster.
    """
    minx, miny, maxx, maxy = extent
    if not (minx < maxx and miny < maxy):
        raise ExtentError(f"--extent {_fmt_extent(extent)}: needs MINX < MAXX and MINY < MAXY")
    inverse = ~transform
    # Rounding first keeps float noise (49.9999999) from adding a pixel row or column.
    cols, rows = zip(
        *(
            (round(c, 6), round(r, 6))
            for c, r in (inverse * (x, y) for x in (minx, maxx) for y in (miny, maxy))
        ),
        strict=True,
    )
    c0, c1 = max(0, math.floor(min(cols))), min(width, math.ceil(max(cols)))
    r0, r1 = max(0, math.floor(min(rows))), min(height, math.ceil(max(rows)))
    if c0 >= c1 or r0 >= r1:
        xs, ys = zip(*(transform * (c, r) for c in (0, width) for r in (0, height)), strict=True)
        raise ExtentError(
            f"--extent {_fmt_extent(extent)}: lies outside {name} "
            f"(raster bounds {_fmt_extent((min(xs), min(ys), max(xs), max(ys)))})"
        )
    return Window(c0, r0, c1 - c0, r1 - r0)


def _fmt_extent(extent: Sequence[float]) -> str:
    return ",".join(f"{v:.10g}" for v in extent)


# ------------------------------------------------------------------------------------------------ reading


def open_raster(path: str | Path) -> rasterio.io.DatasetReader:
    """Open ``path`` with rasterio for reading.

    Raises:
        InputError: the file doesn't exist, is a directory, or GDAL can't read it as a raster.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a raster file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(path)
    except RasterioError as exc:
        detail = _gdal_detail(exc)
        raise InputError(f"{path}: not a raster GDAL can read{f' ({detail})' if detail else ''}") from None
    if dataset.count == 0:
        dataset.close()
        raise InputError(f"{path}: has no raster bands (is it a vector file?)")
    return dataset


def _gdal_detail(exc: BaseException) -> str:
    """GDAL's own message behind a rasterio error, on one line (empty if it says nothing useful)."""
    text = str(exc.__cause__ or exc).strip().splitlines()
    line = text[0] if text else ""
    return "" if "See previous exception" in line or "not recognized as" in line else line[:200]


class RasterSource:
    """An open raster prepared for one model: band selection, normalisation, nodata, extent, resampling.

    Use as a context manager (or call :meth:`close`). Construction validates what a user can get wrong without
    reading pixels: the file, the band selection against the model card, the dtype. :meth:`restrict` applies
    ``--extent``; :meth:`check_has_data` rejects all-nodata rasters.

    Args:
        path: raster file.
        card: the model card (bands, per-band mean/std in raw units, GSD in m/px).
        bands: 1-based band indexes to feed the model (repeats allowed, e.g. ``[1, 1, 1]`` for a single-band
            raster and a 3-band model); None -> the first ``card.bands`` bands.
        resample: resample to ``card.gsd`` when the raster's pixel size differs from it by more than
            ``resample_factor``.

    Raises:
        InputError: unreadable file, bands the model can't take, unsupported dtype.
    """

    def __init__(
        self,
        path: str | Path,
        card: ModelCard,
        bands: Sequence[int] | None = None,
        resample: bool = True,
        resample_factor: float = RESAMPLE_FACTOR,
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.card = card
        self._ds = open_raster(self.path)
        try:
            self._setup(bands, resample, resample_factor)
        except BaseException:
            self._ds.close()
            raise

    def _setup(self, bands: Sequence[int] | None, resample: bool, factor: float) -> None:
        ds, card = self._ds, self.card
        self.bands = _select_bands(bands, ds.count, card, self.path)
        dtypes = {ds.dtypes[b - 1] for b in self.bands}
        unsupported = dtypes - SUPPORTED_DTYPES
        if unsupported:
            raise InputError(f"{self.path}: pixel type {sorted(unsupported)[0]} is not supported")
        self.complex = any(np.dtype(d).kind == "c" for d in dtypes)

        gcps, gcp_crs = ds.gcps
        if not ds.transform.is_identity:
            self.transform, self.crs = ds.transform, ds.crs
        elif gcps:
            # An affine fit only approximates GCP georeferencing, but lands objects near their place.
            log.warning("%s: has GCPs only; using an affine fit of its %d GCPs", self.name, len(gcps))
            self.transform, self.crs = from_gcps(gcps), gcp_crs
        else:
            self.transform, self.crs = PIXEL_FRAME, None

        scale = (1.0, 1.0)
        size_m = pixel_size_m(self.crs, self.transform, ds.width, ds.height)
        if resample and card.gsd and size_m:
            ratios = (size_m[0] / card.gsd, size_m[1] / card.gsd)
            if any(r > factor or r < 1 / factor for r in ratios):
                scale = ratios
                log.info(
                    "%s: pixel size %.3g x %.3g m, model GSD %.3g m: resampling by %.3g x %.3g",
                    self.name,
                    size_m[0],
                    size_m[1],
                    card.gsd,
                    *ratios,
                )
        self.pixel_size_m = size_m
        self._scale = scale
        self.grid = make_grid(Window(0, 0, ds.width, ds.height), self.transform, scale)
        self._mean = np.asarray(card.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(card.std, dtype=np.float32).reshape(-1, 1, 1)

    # -- lifecycle

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning and checks

    def restrict(self, extent: Sequence[float]) -> None:
        """Limit the grid to ``extent`` = (minx, miny, maxx, maxy) in this raster's map units (the pixel frame
        for rasters without georeferencing), clipped to the raster.

        Raises:
            ExtentError: the extent is malformed or lies outside the raster.
        """
        window = extent_window(extent, self.transform, self._ds.width, self._ds.height, str(self.path))
        self.grid = make_grid(window, self.transform, self._scale)

    def plan(self, tile_size: int, overlap: int) -> TilePlan:
        """Tiles over this source's grid (see :func:`plan_tiles`)."""
        return plan_tiles(self.grid.width, self.grid.height, tile_size, overlap)

    def check_has_data(self) -> None:
        """Make sure the selected window holds at least one valid pixel.

        A decimated read of the masks (GDAL uses overviews where the file has them) settles the usual case
        cheaply; only when it finds nothing is the window scanned in blocks, so a small valid patch is not
        mistaken for an empty raster. Memory stays bounded either way.

        Raises:
            InputError: the raster (window) is entirely nodata, or its pixels can't be read (corrupt file).
        """
        self._probe_last_block()
        win = self.grid.window
        step = max(1.0, max(win.width, win.height) / NODATA_CHECK_SIZE)
        shape = (len(self.bands), max(1, round(win.height / step)), max(1, round(win.width / step)))
        if self._valid(win, shape).any():
            return
        for r0 in range(0, win.height, NODATA_SCAN_BLOCK):
            for c0 in range(0, win.width, NODATA_SCAN_BLOCK):
                w = min(NODATA_SCAN_BLOCK, win.width - c0)
                h = min(NODATA_SCAN_BLOCK, win.height - r0)
                block = Window(win.col_off + c0, win.row_off + r0, w, h)
                if self._valid(block, (len(self.bands), h, w)).any():
                    return
        where = " inside --extent" if (win.width, win.height) != (self._ds.width, self._ds.height) else ""
        raise InputError(f"{self.path}: raster is entirely nodata{where}")

    def _probe_last_block(self) -> None:
        """Read the last block of each selected band: a truncated file loses its last blocks first, so this
        finds truncation before any output exists, at the cost of one block read."""
        for band in sorted(set(self.bands)):
            bh, bw = self._ds.block_shapes[band - 1]
            row, col = (self._ds.height - 1) // bh, (self._ds.width - 1) // bw
            window = self._ds.block_window(band, row, col)
            try:
                self._ds.read(band, window=window)
            except RasterioError as exc:
                raise self._read_error(window, exc) from None

    def _valid(self, window: Window, shape: tuple[int, int, int]) -> np.ndarray:
        """(H, W) bool: pixels valid in at least one selected band (GDAL mask: nodata value, alpha, mask band)
        and finite in every band."""
        try:
            masks = self._ds.read_masks(self.bands, window=window, out_shape=shape)
            valid = masks.any(axis=0)
            if any(np.dtype(self._ds.dtypes[b - 1]).kind == "f" for b in self.bands):
                data = self._ds.read(self.bands, window=window, out_shape=shape)
                valid &= np.isfinite(data).all(axis=0)
        except RasterioError as exc:
            raise self._read_error(window, exc) from None
        return valid

    def _read_error(self, window: Window, exc: BaseException) -> InputError:
        detail = _gdal_detail(exc)
        return InputError(
            f"{self.path}: raster data is corrupt or truncated (cannot read pixels at column "
            f"{window.col_off:.0f}, row {window.row_off:.0f}{f': {detail}' if detail else ''})"
        )

    # -- reading

    def read_tile(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """Read, normalise and pad one tile.

        Returns:
            ``image`` (C, T, T) float32, ``(x - mean) / std`` per band with the card's raw-unit mean/std
            (complex pixels -> magnitude first); nodata and padding pixels are 0 (the band mean).
            ``valid`` (T, T) bool: False on nodata, non-finite and padding pixels.

        Raises:
            InputError: GDAL fails to read the pixels (corrupt or truncated file).
        """
        size = tile.size
        w = min(size, self.grid.width - tile.x0)
        h = min(size, self.grid.height - tile.y0)
        src_window = self.grid.source_window(tile.x0, tile.y0, w, h)
        shape = (len(self.bands), h, w)
        try:
            data = self._read_data(src_window, shape)
            masks = self._ds.read_masks(self.bands, window=src_window, out_shape=shape)
        except RasterioError as exc:
            raise self._read_error(src_window, exc) from None
        valid = masks.any(axis=0) & np.isfinite(data).all(axis=0)
        image = np.zeros((len(self.bands), size, size), dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            image[:, :h, :w] = np.where(valid, (data - self._mean) / self._std, 0.0)
        valid_full = np.zeros((size, size), dtype=bool)
        valid_full[:h, :w] = valid
        return image, valid_full

    def _read_data(self, window: Window, shape: tuple[int, int, int]) -> np.ndarray:
        """(C, h, w) float32 pixels under a (possibly fractional) source window, resampled bilinearly to
        ``shape`` where the grid is resampled; complex -> magnitude."""
        if not self.complex:
            data = self._ds.read(self.bands, window=window, out_shape=shape, resampling=Resampling.bilinear)
            return data.astype(np.float32, copy=False)
        if not self.grid.resampled:
            return np.abs(self._ds.read(self.bands, window=window)).astype(np.float32)
        # Interpolating complex values averages phases and destroys the magnitude (speckle), so read at the
        # native resolution, take the magnitude, then resample that.
        c0, r0 = math.floor(window.col_off), math.floor(window.row_off)
        c1 = min(self._ds.width, math.ceil(window.col_off + window.width) + 1)
        r1 = min(self._ds.height, math.ceil(window.row_off + window.height) + 1)
        native = np.abs(self._ds.read(self.bands, window=Window(c0, r0, c1 - c0, r1 - r0))).astype(np.float32)
        out = np.zeros(shape, dtype=np.float32)
        sx, sy = self.grid.scale
        # Any CRS works: source and destination share it, so the warp is purely the pixel-frame affine.
        rasterio.warp.reproject(
            native,
            out,
            src_transform=Affine.translation(c0, r0),
            dst_transform=Affine.translation(window.col_off, window.row_off) * Affine.scale(sx, sy),
            src_crs="EPSG:3857",
            dst_crs="EPSG:3857",
            resampling=Resampling.bilinear,
        )
        return out


def _select_bands(bands: Sequence[int] | None, count: int, card: ModelCard, path: Path) -> list[int]:
    """Validate the band selection against the raster and the card; returns 1-based indexes."""
    if bands is None:
        if count < card.bands:
            example = ",".join(["1"] * card.bands)
            raise InputError(
                f"{path}: has {count} band(s) but model {card.label} needs {card.bands} "
                f"(pick bands with --bands, e.g. --bands {example})"
            )
        if count > card.bands:
            log.info("%s: %d bands, model takes %d: using the first ones", path.name, count, card.bands)
        return list(range(1, card.bands + 1))
    text = ",".join(str(b) for b in bands)
    if len(bands) != card.bands:
        raise InputError(f"--bands {text}: model {card.label} takes {card.bands} band(s), got {len(bands)}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise InputError(f"--bands {text}: {path} has {count} band(s), no band {bad[0]}")
    return list(bands)
