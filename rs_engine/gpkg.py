"""The output layer: the ``instances`` table of a GeoPackage, appended to batch by batch with pyogrio.

A write the file system refuses (disk full, quota, read-only, the folder removed) raises ``InputError``
naming the folder and the cause (:func:`rs_engine.errors.write_error`). GDAL does not always notice: on a full
disk it can create a GeoPackage without its tables and say nothing, so :meth:`GpkgWriter.create` and
:meth:`GpkgWriter.check` read the file back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyogrio
from pyogrio import errors as ogr_errors
from pyogrio import raw as ogr_raw

from rs_engine.errors import raise_write_error, remove_quietly

LAYER = "instances"
FIELDS = ["class_id", "class_name", "score", "area", "source", "model", "run_id"]
_DTYPES = [np.int32, object, np.float64, np.float64, object, object, object]
#: What pyogrio raises when GDAL fails to write (on a full disk too: few of them carry an errno).
_WRITE_ERRORS = (OSError, ogr_errors.DataSourceError, ogr_errors.DataLayerError, ogr_errors.FieldError,
                 ogr_errors.GeometryError, ogr_errors.CRSError)  # fmt: skip


class GpkgWriter:
    """Appends features to the ``instances`` layer of a GeoPackage (pyogrio), batch by batch.

    Rows are ``(WKB MultiPolygon, *FIELDS values)``; ``crs_wkt`` None writes a layer without CRS (the pixel
    frame of rasters without georeferencing). ``name`` is the file name error messages give (the output's, when
    ``path`` is its temporary file).

    Raises (every method that writes):
        InputError: the file system refused the write: one line naming the folder and the cause.
    """

    def __init__(self, path: Path, crs_wkt: str | None, name: str | None = None) -> None:
        self.path = path
        self.crs_wkt = crs_wkt
        self.name = name or path.name

    def _write(self, rows: list[tuple], append: bool) -> None:
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(len(FIELDS) + 1)]
        field_data = [np.asarray(col, dtype=dtype) for col, dtype in zip(columns[1:], _DTYPES, strict=True)]
        with warnings.catch_warnings():
            # No CRS is intended for rasters without georeferencing (QGIS pixel frame).
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            try:
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
            except _WRITE_ERRORS as exc:
                self._raise(exc)

    def _raise(self, exc: BaseException) -> None:
        raise_write_error(self.path, exc, self.name)

    def create(self) -> None:
        """Create the file with an empty layer (schema and CRS), so a run with no objects still gives one."""
        self.discard()  # a stale temp file of a crashed run with the same process id
        self._write([], append=False)
        self.check(0)

    def write(self, rows: list[tuple]) -> int:
        """Append ``rows``; returns how many were written."""
        if rows:
            self._write(rows, append=True)
        return len(rows)

    def check(self, features: int) -> None:
        """Read the file back: the layer must be there and hold ``features`` features.

        Raises:
            InputError: it does not (the file system lost or refused a write GDAL did not report).
        """
        try:
            found = pyogrio.read_info(str(self.path), layer=LAYER)["features"]
        except _WRITE_ERRORS as exc:
            self._raise(exc)
        if found != features:
            # e.g. the folder removed and made again mid-run: GDAL appended to a new, empty file
            self._raise(OSError(f"its temporary file {self.path.name} lost features: {features} written, "
                                f"{found} in it"))

    def discard(self) -> list[Path]:
        """Remove the file and its SQLite side files; returns those that could not be removed (read-only)."""
        return remove_quietly(*(f"{self.path}{suffix}" for suffix in ("", "-journal", "-wal", "-shm")))
