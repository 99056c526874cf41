"""Open a raster, work out its georeferencing, read and normalise windows: the one pixel reader of the project.

Inference (:mod:`rs_engine.pipeline`), evaluation and every training dataset read pixels through
:class:`RasterSource`, so the same file gives the same pixels everywhere. Everything works window by window: no
function reads a whole raster, so memory does not grow with the raster's size. Source and grid pixels are the
frames of :mod:`rs_engine.tiling`; *map* coordinates are the raster's CRS units (:func:`georeference`). A raster
without georeferencing gets the pixel frame QGIS uses for such rasters (x = column, y = -row) and no CRS.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
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

from rs_engine.errors import InputError
from rs_engine.tiling import Tile, TilePlan, make_grid, plan_tiles

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


def check_extent(extent: Sequence[float]) -> tuple[float, float, float, float]:
    """The one check of an ``--extent``: four finite numbers, MINX < MAXX and MINY < MAXY.

    Raises:
        ExtentError: otherwise (one line naming the extent).
    """
    values = tuple(float(v) for v in extent)
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ExtentError(f"--extent {_fmt_extent(values)}: needs four numbers MINX,MINY,MAXX,MAXY")
    if not (values[0] < values[2] and values[1] < values[3]):
        raise ExtentError(f"--extent {_fmt_extent(values)}: needs MINX < MAXX and MINY < MAXY")
    return values  # type: ignore[return-value]


def extent_window(extent: Sequence[float], transform: Affine, width: int, height: int, name: str) -> Window:
    """Source window (integer, clipped to the raster) covering ``extent`` = (minx, miny, maxx, maxy).

    Works for rotated transforms (the window covers the extent's four corners).

    Raises:
        ExtentError: the extent is malformed or doesn't overlap the raster.
    """
    minx, miny, maxx, maxy = check_extent(extent)
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


def georeference(ds: rasterio.io.DatasetReader) -> tuple[Affine, CRS | None]:
    """The map frame of an open raster: ``(transform, crs)``, pixel (col, row) -> map (x, y).

    The file's geotransform where it has one; else an affine fit of its GCPs (SAR scenes often carry only GCPs;
    the fit only approximates GCP georeferencing but lands objects near their place); else :data:`PIXEL_FRAME`
    and no CRS. Inference and evaluation both use this, so a scene is scored in the frame it was segmented in.
    """
    gcps, gcp_crs = ds.gcps
    if not ds.transform.is_identity:
        return ds.transform, ds.crs
    if gcps:
        _warn_once(Path(ds.name), "%s: has GCPs only; using an affine fit of its %d GCPs", len(gcps))
        return from_gcps(gcps), gcp_crs
    return PIXEL_FRAME, None


class RasterSource:
    """An open raster prepared for a network: band selection, normalisation, nodata, extent, resampling.

    Use as a context manager (or call :meth:`close`). Construction validates what a user can get wrong without
    reading pixels: the file, the band selection, the dtype. :meth:`restrict` applies ``--extent``;
    :meth:`check_has_data` rejects all-nodata rasters. :meth:`read_tile` reads a tile of the grid,
    :meth:`read_window` any window of the source pixels.

    Attributes ``n_bands``, ``mean``, ``std``, ``gsd``, ``bands`` and ``label`` are the resolved arguments
    (``mean``/``std`` lists), enough to reopen the source elsewhere (a Dask worker).

    Args:
        path: raster file.
        n_bands: bands the network takes.
        mean, std: per-band normalisation in raw units (complex: of the magnitude); None: raw values.
        gsd: the network's ground sample distance (m/px), or None: never resample.
        bands: 1-based band indexes to feed it (repeats allowed, e.g. ``[1, 1, 1]``); None: the first
            ``n_bands`` bands, or band 1 repeated for a single-band raster (SAR, panchromatic) and a multi-band
            network, with a warning.
        resample: resample to ``gsd`` when the raster's pixel size differs from it by more than
            ``resample_factor``.
        label: how errors name the network (``model nwpu10 0.3``).

    Raises:
        InputError: unreadable file, bands the network can't take, unsupported dtype.
    """

    def __init__(
        self,
        path: str | Path,
        n_bands: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        gsd: float | None = None,
        bands: Sequence[int] | None = None,
        resample: bool = True,
        resample_factor: float = RESAMPLE_FACTOR,
        label: str = "the model",
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.n_bands, self.gsd, self.label = n_bands, gsd, label
        self._ds = open_raster(self.path)
        try:
            self._setup(bands, resample, resample_factor, mean, std)
        except BaseException:
            self._ds.close()
            raise

    def _setup(self, bands: Sequence[int] | None, resample: bool, factor: float,
               mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        ds = self._ds
        self.bands = _select_bands(bands, ds.count, self.n_bands, self.label, self.path)
        dtypes = {ds.dtypes[b - 1] for b in self.bands}
        unsupported = dtypes - SUPPORTED_DTYPES
        if unsupported:
            raise InputError(f"{self.path}: pixel type {sorted(unsupported)[0]} is not supported")
        self.complex = any(np.dtype(d).kind == "c" for d in dtypes)
        self.transform, self.crs = georeference(ds)

        scale = (1.0, 1.0)
        size_m = pixel_size_m(self.crs, self.transform, ds.width, ds.height)
        if resample and self.gsd and size_m:
            ratios = (size_m[0] / self.gsd, size_m[1] / self.gsd)
            if any(r > factor or r < 1 / factor for r in ratios):
                scale = ratios
                log.info("%s: pixel size %.3g x %.3g m, model GSD %.3g m: resampling by %.3g x %.3g",
                         self.name, size_m[0], size_m[1], self.gsd, *ratios)
        self.pixel_size_m = size_m
        self._scale = scale
        self.grid = make_grid(Window(0, 0, ds.width, ds.height), self.transform, scale)
        n = len(self.bands)
        self.mean = [float(v) for v in mean] if mean is not None else [0.0] * n
        self.std = [float(v) for v in std] if std is not None else [1.0] * n
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"{len(self.mean)}/{len(self.std)} mean/std values for {n} bands")
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)

    @property
    def width(self) -> int:
        """Source width in pixels."""
        return self._ds.width

    @property
    def height(self) -> int:
        """Source height in pixels."""
        return self._ds.height

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
        """Read, normalise and pad one tile of the grid.

        Returns:
            ``image`` (C, T, T) float32, ``(x - mean) / std`` per band (complex pixels -> magnitude first);
            nodata and padding pixels are 0 (the band mean).
            ``valid`` (T, T) bool: False on nodata, non-finite and padding pixels.

        Raises:
            InputError: GDAL fails to read the pixels (corrupt or truncated file).
        """
        return self.read_grid(tile.x0, tile.y0, tile.size)

    def read_grid(self, x0: int, y0: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Read, normalise and pad the ``size`` x ``size`` grid window at grid pixel (``x0``, ``y0``) (inside the
        grid; it may reach past its right and bottom edges, which read as padding): as :meth:`read_tile`."""
        w = min(size, self.grid.width - x0)
        h = min(size, self.grid.height - y0)
        data, valid = self._read(self.grid.source_window(x0, y0, w, h), (len(self.bands), h, w))
        image = np.zeros((len(self.bands), size, size), dtype=np.float32)
        image[:, :h, :w] = data
        valid_full = np.zeros((size, size), dtype=bool)
        valid_full[:h, :w] = valid
        return image, valid_full

    def read_window(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read and normalise a window of the *source* pixels (no resampling), e.g. a training chip.

        Parts of ``window`` outside the raster read as invalid zeros, so a chip at the raster's edge keeps its
        size.

        Args:
            window: rasterio window (integer offsets and size; it may reach outside the raster).

        Returns:
            ``image`` (C, h, w) float32 as :meth:`read_tile`, and ``valid`` (h, w) bool.

        Raises:
            InputError: GDAL fails to read the pixels (corrupt or truncated file).
        """
        c0, r0, w, h = (int(v) for v in (window.col_off, window.row_off, window.width, window.height))
        image = np.zeros((len(self.bands), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        ic0, ir0 = max(c0, 0), max(r0, 0)
        ic1, ir1 = min(c0 + w, self.width), min(r0 + h, self.height)
        if ic1 > ic0 and ir1 > ir0:
            inner = Window(ic0, ir0, ic1 - ic0, ir1 - ir0)
            data, ok = self._read(inner, (len(self.bands), ir1 - ir0, ic1 - ic0), resampling=False)
            image[:, ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = data
            valid[ir0 - r0:ir1 - r0, ic0 - c0:ic1 - c0] = ok
        return image, valid

    def _read(self, window: Window, shape: tuple[int, int, int], resampling: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised (C, h, w) pixels and (h, w) validity under a source window, resampled to ``shape``."""
        try:
            data = self._read_data(window, shape, resampling)
            masks = self._ds.read_masks(self.bands, window=window, out_shape=shape)
        except RasterioError as exc:
            raise self._read_error(window, exc) from None
        valid = masks.any(axis=0) & np.isfinite(data).all(axis=0)
        with np.errstate(invalid="ignore", over="ignore"):
            return np.where(valid, (data - self._mean) / self._std, 0.0).astype(np.float32, copy=False), valid

    def _read_data(self, window: Window, shape: tuple[int, int, int], resampling: bool = True) -> np.ndarray:
        """(C, h, w) float32 pixels under a (possibly fractional) source window, resampled bilinearly to
        ``shape`` where the grid is resampled; complex -> magnitude."""
        if not self.complex:
            data = self._ds.read(self.bands, window=window, out_shape=shape, resampling=Resampling.bilinear)
            return data.astype(np.float32, copy=False)
        if not (resampling and self.grid.resampled):
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


def _select_bands(bands: Sequence[int] | None, count: int, n: int, label: str, path: Path) -> list[int]:
    """Validate the band selection against the raster and the network's ``n`` bands; 1-based indexes."""
    if bands is None:
        if count == 1 and n > 1:
            _warn_once(path, "%s: has 1 band, %s takes %d: repeating band 1 (as --bands %s)", label, n,
                       ",".join(["1"] * n))
            return [1] * n
        if count < n:
            raise InputError(f"{path}: has {count} band(s) but {label} needs {n} "
                             f"(pick bands with --bands, e.g. --bands {','.join(['1'] * n)})")
        if count > n:
            log.info("%s: %d bands, %s takes %d: using the first ones", path.name, count, label, n)
        return list(range(1, n + 1))
    text = ",".join(str(b) for b in bands)
    if len(bands) != n:
        raise InputError(f"--bands {text}: {label} takes {n} band(s), got {len(bands)}")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise InputError(f"--bands {text}: {path} has {count} band(s), no band {bad[0]}")
    return list(bands)


_warned: set[tuple[str, str]] = set()


def _warn_once(path: Path, message: str, *args: object) -> None:
    """Log a notice about a file once per process: training datasets open a source per chip, and the analyst
    needs the notice once, not once per chip and epoch. ``message``'s first ``%s`` is the file name."""
    key = (str(Path(path).absolute()), message)
    if key not in _warned:
        _warned.add(key)
        log.warning(message, Path(path).name, *args)
