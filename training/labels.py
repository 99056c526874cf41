"""Polygon labels and AOIs from an analyst's vector layer, with geopandas (any OGR format).

Labels are read with :func:`geopandas.read_file` (pyogrio engine, the layer's FIDs as index, as QGIS shows them),
reprojected with :meth:`~geopandas.GeoDataFrame.to_crs` to each raster's CRS, invalid geometries repaired with
:meth:`~geopandas.GeoSeries.make_valid` (polygonal parts kept), and empty, null, non-polygon or unreprojectable
features skipped with one warning per kind listing the feature ids. A MultiPolygon feature is one instance. Class
names are the sorted distinct values of the class field (numerically sorted when they are all numbers; ``1.0``
reads as ``"1"``; null or blank values are skipped and reported), mapped to labels 1..K; with ``class_names``
given (fine-tuning a model), those are used and unknown values are an error. Labels without a CRS are taken to
be in the raster's CRS (warning).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas
import numpy as np
import pyogrio
import shapely
from pyogrio.errors import DataLayerError, DataSourceError, FieldError, GeometryError
from rasterio.crs import CRS
from rasterio.errors import CRSError
from shapely.geometry.base import BaseGeometry

from rs_engine.errors import InputError

log = logging.getLogger(__name__)

#: Feature ids listed in one log message at most.
MAX_LISTED = 20
EMPTY = shapely.GeometryCollection()
_POLYGONAL = ("Polygon", "MultiPolygon")
_READ_ERRORS = (DataSourceError, DataLayerError, FieldError, GeometryError, OSError)


@dataclass
class LabelSet:
    """Polygon labels of one layer in one raster's CRS.

    Attributes:
        geometries: valid, non-empty Polygons / MultiPolygons in the raster's CRS (map units).
        labels: class labels 1..len(class_names), one per geometry.
        fids: the layer's feature ids (FIDs), one per geometry, for messages.
    """

    geometries: list[BaseGeometry]
    labels: list[int]
    fids: list[int]

    def __len__(self) -> int:
        return len(self.geometries)


def load_labels(
    path: str | Path, class_field: str, crs: CRS | None, class_names: Sequence[str] | None = None
) -> tuple[LabelSet, list[str]]:
    """Read a polygon layer with a class field, in ``crs``.

    Args:
        path: any OGR vector file (GeoPackage, GeoJSON, Shapefile, ...); its first layer is read.
        class_field: the attribute holding the class (text or number). Matched exactly, else ignoring case.
        crs: the raster's CRS to reproject to; None: no reprojection (coordinates used as they are).
        class_names: the classes to map to labels 1..K (a model's classes when fine-tuning); None: the sorted
            distinct values of ``class_field``.

    Returns:
        The labels (see :class:`LabelSet`) and the class names (label i is ``class_names[i - 1]``).

    Raises:
        InputError: the file is missing or unreadable, has no ``class_field`` (the message lists the fields),
            holds values not in ``class_names``, or has no polygon feature with a class left.
    """
    path = Path(path)
    info = layer_info(path)
    field = _match_field(class_field, [str(f) for f in info["fields"]], path)
    frame = read_polygons(path, crs, [field])
    texts = frame[field].map(_class_text)
    report(path, f"skipped {{n}} feature(s) with no value in '{field}'", frame.index[texts.isna()])
    frame, texts = frame[texts.notna()], texts[texts.notna()].tolist()
    if frame.empty:
        raise InputError(f"{path}: no polygon feature with a class in field '{field}' (is it a polygon layer?)")
    if class_names is None:
        names = sorted(set(texts), key=(lambda t: (float(t), t)) if all(map(_is_number, texts)) else None)
    else:
        names = [str(n) for n in class_names]
        unknown = sorted(set(texts) - set(names))
        if unknown:
            raise InputError(
                f"{path}: field '{field}' has classes the model doesn't know: {', '.join(unknown)} "
                f"(model classes: {', '.join(names)})"
            )
    index = {n: i + 1 for i, n in enumerate(names)}
    labels = LabelSet(list(frame.geometry), [index[t] for t in texts], [int(f) for f in frame.index])
    log.info("%s: %d labelled feature(s), classes %s", path.name, len(labels), names)
    return labels, names


def load_aoi(path: str | Path, crs: CRS | None) -> BaseGeometry:
    """Union of the polygons of an AOI layer (the fully annotated area), in ``crs`` (None: no reprojection).

    Invalid polygons are repaired, empty and non-polygon features skipped (as :func:`load_labels`).

    Raises:
        InputError: the file is missing or unreadable, or has no polygon.
    """
    path = Path(path)
    layer_info(path)
    frame = read_polygons(path, crs, [])
    if frame.empty:
        raise InputError(f"{path}: AOI layer has no polygon")
    return frame.geometry.union_all()


def layer_info(path: Path) -> dict[str, Any]:
    """pyogrio's description of the layer (fields, CRS, geometry type).

    Raises:
        InputError: the file is missing, unreadable, or a table without geometry.
    """
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        info = pyogrio.read_info(path)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: not a vector layer GDAL can read ({_first_line(exc)})") from None
    if info.get("geometry_type") is None:
        raise InputError(f"{path}: layer has no geometry (is it a table?)")
    return info


def layer_crs(path: Path) -> CRS | None:
    """The layer's CRS, or None when it has none.

    Raises:
        InputError: as :func:`layer_info`, or a CRS that is not understood.
    """
    text = layer_info(path).get("crs")
    if not text:
        return None
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"{path}: its CRS is not understood ({_first_line(exc)})") from None


def read_polygons(path: Path, crs: CRS | None, columns: list[str]) -> geopandas.GeoDataFrame:
    """Valid (Multi)Polygons of a layer in ``crs``, indexed by FID, with ``columns``.

    Skipped features (null, empty, not polygonal, not reprojectable) are reported by FID; invalid ones repaired.
    """
    try:
        frame = geopandas.read_file(path, engine="pyogrio", columns=columns, fid_as_index=True, force_2d=True,
                                    on_invalid="ignore")  # fmt: skip
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: not a vector layer GDAL can read ({_first_line(exc)})") from None
    missing = frame.geometry.isna() | frame.geometry.is_empty
    report(path, "skipped {n} feature(s) with empty or missing geometry", frame.index[missing])
    frame = frame[~missing]

    if frame.crs is None and crs is not None:
        log.warning("%s: layer has no CRS; assuming the raster's (%s)", path.name, crs.to_string())
    elif frame.crs is not None and crs is None:
        log.warning("%s: layer is in %s but the raster has no CRS; using coordinates as they are",
                    path.name, frame.crs.to_string())
    elif frame.crs is not None and CRS.from_wkt(frame.crs.to_wkt()) != crs:
        frame = frame.to_crs(crs.to_wkt())
        lost = ~np.isfinite(frame.geometry.bounds.to_numpy()).all(axis=1)
        report(path, f"skipped {{n}} feature(s) that can't be reprojected to {crs.to_string()}", frame.index[lost])
        frame = frame[~lost]

    invalid = ~frame.geometry.is_valid
    if invalid.any():
        frame.loc[invalid, frame.geometry.name] = frame.geometry[invalid].make_valid()
        report(path, "repaired {n} invalid polygon(s)", frame.index[invalid])
    kinds = frame.geometry.geom_type.copy()
    frame = frame.set_geometry(frame.geometry.map(polygonal))
    ok = frame.geometry.notna()
    ok[ok] = frame.geometry[ok].area > 0
    if (~ok).any():  # a zero-area polygon or an empty collection is "degenerate"
        names = sorted({"degenerate" if k in (*_POLYGONAL, "GeometryCollection", None) else k for k in kinds[~ok]})
        report(path, f"skipped {{n}} feature(s) that are not polygons ({', '.join(names)})", frame.index[~ok])
    return frame[ok]


def polygonal(geom: BaseGeometry | None) -> BaseGeometry | None:
    """The polygonal part of a geometry (a collection's polygons, unioned), or None when it has none."""
    if geom is None:
        return None
    if geom.geom_type in _POLYGONAL:
        return geom
    if geom.geom_type != "GeometryCollection":
        return None
    polys = [p for p in shapely.get_parts(shapely.get_parts(geom)) if p.geom_type == "Polygon" and not p.is_empty]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else shapely.union_all(polys)


def _match_field(name: str, fields: list[str], path: Path) -> str:
    if name in fields:
        return name
    folded = [f for f in fields if f.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    raise InputError(f"{path}: no field '{name}' (fields: {', '.join(fields) or 'none'})")


def _class_text(value: Any) -> str | None:
    """A class field value as a class name; None for null, NaN or blank."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip()
    return text or None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def report(path: Path, message: str, fids: Sequence[int] | np.ndarray) -> None:
    """Warn about features by FID: ``message`` with ``{n}`` replaced by their count."""
    fids = np.asarray(fids, dtype=np.int64)
    if not len(fids):
        return
    listed = ", ".join(str(int(f)) for f in fids[:MAX_LISTED])
    more = f" and {len(fids) - MAX_LISTED} more" if len(fids) > MAX_LISTED else ""
    log.warning("%s: %s (feature ids %s%s)", path.name, message.format(n=len(fids)), listed, more)



def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
