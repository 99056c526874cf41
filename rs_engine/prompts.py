"""Prompts for outlining: read from a vector file (``rs-engine outline --prompts``) or built from coordinates
(``rs-engine serve``), and reprojected to the raster's CRS.

A point is a positive click on one object (a MultiPoint: several clicks on the same object); a polygon's bounding
box (in the raster's CRS, after reprojection) is a box prompt.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from pyogrio import errors as ogr_errors
from pyogrio import raw as ogr_raw
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape

from rs_engine.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One object to outline, in the raster's CRS (its pixel frame x = column, y = -row without one).

    Attributes:
        id: the prompt's feature id (or the request's id).
        points: ((x, y), ...) positive points, or None for a box prompt.
        box: (minx, miny, maxx, maxy), or None for a point prompt.
    """

    id: int | str
    points: tuple[tuple[float, float], ...] | None = None
    box: tuple[float, float, float, float] | None = None


def parse_crs(text: str | None, what: str) -> CRS | None:
    """A CRS from EPSG:N, WKT or PROJ text; None stays None.

    Raises:
        InputError: text no CRS library understands.
    """
    if text is None or text == "":
        return None
    try:
        return CRS.from_user_input(text)
    except CRSError:
        raise InputError(f"{what}: CRS {str(text)[:60]!r} is not understood") from None


def prompt_from_geometry(prompt_id: int | str, geometry: shapely.Geometry | None, crs: CRS | None,
                         raster_crs: CRS | None) -> Prompt:
    """A prompt from a point, multipoint or polygon geometry in ``crs``, reprojected to ``raster_crs``.

    Raises:
        InputError: no or empty geometry, a type other than (multi)point or (multi)polygon, or a CRS given for a
            raster without one.
    """
    if geometry is None or geometry.is_empty:
        raise InputError(f"prompt {prompt_id}: has no geometry")
    kind = geometry.geom_type
    if kind not in ("Point", "MultiPoint", "Polygon", "MultiPolygon"):
        raise InputError(f"prompt {prompt_id}: a {kind} is not a prompt; use points or polygons (boxes)")
    if crs is not None and raster_crs is None:
        raise InputError(f"prompt {prompt_id}: the prompts have a CRS but the raster has none; give them without "
                         "CRS, in its pixel frame (x = column, y = -row)")
    if crs is not None and crs != raster_crs:
        geometry = shape(transform_geom(crs, raster_crs, mapping(geometry)))
    coords = shapely.get_coordinates(geometry)
    if not np.isfinite(coords).all():
        raise InputError(f"prompt {prompt_id}: coordinates are not finite (outside the raster's CRS?)")
    if kind in ("Point", "MultiPoint"):
        return Prompt(prompt_id, points=tuple((float(x), float(y)) for x, y in coords))
    minx, miny, maxx, maxy = geometry.bounds
    return Prompt(prompt_id, box=(minx, miny, maxx, maxy))


def read_prompts(path: str | Path, raster_crs: CRS | None) -> list[Prompt]:
    """Every feature of a vector file's first layer as a prompt, in the raster's CRS (a file without CRS is taken
    to be in the raster's, with a warning).

    Raises:
        InputError: missing or unreadable file, no features, or a feature that is no prompt (one line naming it).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: prompts file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta, fids, geometries, _ = ogr_raw.read(str(path), read_geometry=True, return_fids=True,
                                                     columns=[])  # fmt: skip
    except (ogr_errors.DataSourceError, ogr_errors.DataLayerError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise InputError(f"{path}: not a vector file GDAL can read ({detail})") from None
    if fids is None or len(fids) == 0:
        raise InputError(f"{path}: holds no prompts (no features)")
    crs = parse_crs(meta.get("crs"), str(path))
    if crs is None and raster_crs is not None:
        log.warning("%s: no CRS; its coordinates are taken to be in the raster's CRS", path.name)
    return [prompt_from_geometry(int(fid), shapely.from_wkb(g) if g is not None else None, crs, raster_crs)
            for fid, g in zip(fids, geometries, strict=True)]


def prompt_from_request(prompt_id: int | str, point: Sequence[float] | None, box: Sequence[float] | None,
                        crs: CRS | None, raster_crs: CRS | None) -> Prompt:
    """A ``serve`` request's ``point`` [x, y] (or [[x, y], ...]) or ``box`` [minx, miny, maxx, maxy] as a prompt.

    Raises:
        InputError: neither or both given, or malformed coordinates.
    """
    if (point is None) == (box is None):
        raise InputError("a prompt needs either 'point' or 'box'")
    try:
        if point is not None:
            pts = np.asarray(point, dtype=np.float64).reshape(-1, 2)
            geom = shapely.points(pts)
            geom = geom[0] if len(geom) == 1 else shapely.multipoints(pts)
        else:
            minx, miny, maxx, maxy = (float(v) for v in box)  # type: ignore[union-attr]
            if not (minx < maxx and miny < maxy):
                raise InputError(f"prompt {prompt_id}: box needs minx < maxx and miny < maxy")
            geom = shapely.box(minx, miny, maxx, maxy)
    except (TypeError, ValueError):
        raise InputError(f"prompt {prompt_id}: point needs [x, y] and box [minx, miny, maxx, maxy]") from None
    return prompt_from_geometry(prompt_id, geom, crs, raster_crs)
