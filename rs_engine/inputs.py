"""What a run reads and in which frame it writes: input expansion (files, folders, globs, VRT mosaics), the
opening and cross-checking of every input before any work starts, and the output CRS.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from pathlib import Path

from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform_bounds

from rs_engine.card import ModelCard
from rs_engine.errors import InputError
from rs_engine.raster import ExtentError, RasterSource

log = logging.getLogger(__name__)

#: File endings taken from a folder given as input (GeoTIFF, GDAL VRT mosaics, ERDAS, JPEG 2000, NITF).
#: Any other file GDAL reads can still be named explicitly.
RASTER_SUFFIXES = frozenset({".tif", ".tiff", ".vrt", ".img", ".jp2", ".ntf", ".nitf"})


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input arguments -> raster files, in order, each once.

    A folder gives its files ending in :data:`RASTER_SUFFIXES` (sorted, not recursive); an argument with
    ``*``, ``?`` or ``[`` that is not itself a file is a glob pattern (sorted matches; ``**`` recurses); anything
    else is a file path, checked when it is opened. A GDAL VRT mosaic is one input: its tiles form one grid.

    Raises:
        InputError: a folder without rasters, or a pattern that matches no file.
    """
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
            if not found:
                endings = " ".join(sorted(RASTER_SUFFIXES))
                raise InputError(f"{path}: folder holds no raster files ({endings})")
            out += found
        elif any(c in str(item) for c in "*?[") and not path.exists():
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"{item}: matches no file")
            out += found
        else:
            out.append(path)
    seen: set[Path] = set()
    unique = [p for p in out if not (p.absolute() in seen or seen.add(p.absolute()))]
    if len(unique) < len(out):
        log.warning("%d input(s) named more than once are segmented once", len(out) - len(unique))
    return unique


def output_crs(text: str | None, sources: Sequence[RasterSource]) -> CRS | None:
    """The CRS the output is written in: ``text`` (``--crs``: EPSG:32616, WKT, PROJ) or the first input's.

    Raises:
        InputError: ``text`` is not a CRS, or is given for rasters without georeferencing.
    """
    if text is None:
        return sources[0].crs
    try:
        crs = CRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"--crs {text}: not a CRS ({' '.join(str(exc).split())[:160]})") from None
    if sources[0].crs is None:
        raise InputError(f"--crs {text}: {sources[0].path} has no CRS to reproject from")
    return crs


def model_source(path: str | Path, card: ModelCard, bands: Sequence[int] | None = None,
                 resample: bool = True) -> RasterSource:
    """:class:`RasterSource` prepared for the model of ``card`` (its bands, normalisation and GSD).

    Raises:
        InputError: as :class:`RasterSource`.
    """
    return RasterSource(path, card.bands, card.mean, card.std, card.gsd, bands, resample, label=f"model {card.label}")


def open_sources(
    inputs: Sequence[str | Path],
    card: ModelCard,
    bands: Sequence[int] | None,
    resample: bool,
    extent: Sequence[float] | None,
) -> list[RasterSource]:
    """Open and validate every input; apply ``extent`` (given in the first input's CRS).

    With several inputs, one the extent misses is skipped (with a warning); the extent must hit at least one.
    Inputs must all have a CRS or all have none.

    Raises:
        InputError: as :class:`RasterSource`, mixed georeferenced and non-georeferenced inputs, or an extent
            that lies outside every input.
    """
    sources: list[RasterSource] = []
    try:
        for path in inputs:
            sources.append(model_source(path, card, bands, resample))
        first = sources[0]
        for source in sources[1:]:
            if (source.crs is None) != (first.crs is None):
                with_crs, without = (first, source) if source.crs is None else (source, first)
                raise InputError(
                    f"{without.path}: has no CRS but {with_crs.path} has one; segment them in separate runs"
                )
            if source.crs is not None and source.crs != first.crs:
                log.warning("%s: CRS differs from %s; its objects are reprojected", source.name, first.name)
        if extent is None:
            return sources
        kept, missed = [], []
        for source in sources:
            box = extent
            if source.crs is not None and source.crs != first.crs:
                box = transform_bounds(first.crs, source.crs, *extent, densify_pts=21)
            try:
                source.restrict(box)
                kept.append(source)
            except ExtentError as exc:
                if len(sources) == 1:
                    raise
                missed.append(source)
                log.warning("%s", exc)
        if not kept:
            names = ", ".join(s.name for s in sources)
            text = ",".join(f"{v:.10g}" for v in extent)
            raise InputError(f"--extent {text}: lies outside every input ({names})")
        for source in missed:
            source.close()
        return kept
    except BaseException:
        for source in sources:
            source.close()
        raise
