"""The output layer: the ``instances`` table of a GeoPackage, appended to batch by batch with pyogrio."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pyogrio import raw as ogr_raw

LAYER = "instances"
FIELDS = ["class_id", "class_name", "score", "area", "source", "model", "run_id"]
_DTYPES = [np.int32, object, np.float64, np.float64, object, object, object]


class GpkgWriter:
    """Appends features to the ``instances`` layer of a GeoPackage (pyogrio), batch by batch.

    Rows are ``(WKB MultiPolygon, *FIELDS values)``; ``crs_wkt`` None writes a layer without CRS (the pixel
    frame of rasters without georeferencing).
    """

    def __init__(self, path: Path, crs_wkt: str | None) -> None:
        self.path = path
        self.crs_wkt = crs_wkt

    def _write(self, rows: list[tuple], append: bool) -> None:
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(len(FIELDS) + 1)]
        field_data = [np.asarray(col, dtype=dtype) for col, dtype in zip(columns[1:], _DTYPES, strict=True)]
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
        """Append ``rows``; returns how many were written."""
        if rows:
            self._write(rows, append=True)
        return len(rows)

    def discard(self) -> None:
        """Remove the file and its SQLite side files."""
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
