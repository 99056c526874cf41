"""The output layer: the ``instances`` table of a GeoPackage, appended to batch by batch with pyogrio.

A write the file system refuses (disk full, quota, read-only, the folder removed) raises ``InputError``
naming the folder and the cause (:func:`rs_engine.errors.write_error`). GDAL does not always notice: on a full
disk it can create a GeoPackage without its tables and say nothing, so :meth:`GpkgWriter.create` and
:meth:`GpkgWriter.check` read the file back.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyogrio
from pyogrio import errors as ogr_errors
from pyogrio import raw as ogr_raw

from rs_engine.errors import InputError, raise_write_error, remove_quietly

LAYER = "instances"
FIELDS = ["class_id", "class_name", "score", "area", "source", "model", "run_id"]
_DTYPES = [np.int32, object, np.float64, np.float64, object, object, object]
#: What pyogrio raises when GDAL fails to write (on a full disk too: few of them carry an errno).
_WRITE_ERRORS = (OSError, ogr_errors.DataSourceError, ogr_errors.DataLayerError, ogr_errors.FieldError,
                 ogr_errors.GeometryError, ogr_errors.CRSError)  # fmt: skip


class GpkgWriter:
    """Appends features to one layer of a GeoPackage (pyogrio), batch by batch: ``instances`` with :data:`FIELDS`
    unless ``layer`` and ``fields`` (``{name: numpy dtype}``) say otherwise.

    Rows are ``(WKB MultiPolygon or None, *field values)``; ``crs_wkt`` None writes a layer without CRS (the pixel
    frame of rasters without georeferencing). ``name`` is the file name error messages give (the output's, when
    ``path`` is its temporary file).

    Raises (every method that writes):
        InputError: the file system refused the write: one line naming the folder and the cause.
    """

    def __init__(self, path: Path, crs_wkt: str | None, name: str | None = None, layer: str = LAYER,
                 fields: dict[str, type] | None = None) -> None:
        self.path = path
        self.crs_wkt = crs_wkt
        self.name = name or path.name
        self.layer = layer
        self.written = 0  # features appended so far
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file create() made
        fields = fields or dict(zip(FIELDS, _DTYPES, strict=True))
        self.fields, self.dtypes = list(fields), list(fields.values())

    def _write(self, rows: list[tuple], append: bool) -> None:
        columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(len(self.fields) + 1)]
        field_data = [np.asarray(col, dtype=dtype) for col, dtype in zip(columns[1:], self.dtypes, strict=True)]
        with warnings.catch_warnings():
            # No CRS is intended for rasters without georeferencing (QGIS pixel frame).
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            try:
                ogr_raw.write(
                    str(self.path),
                    geometry=np.asarray(columns[0], dtype=object),
                    field_data=field_data,
                    fields=self.fields,
                    layer=self.layer,
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
        self._identity = self._stat()
        self.check(0)

    def write(self, rows: list[tuple]) -> int:
        """Append ``rows``; returns how many were written."""
        if rows:
            self._check_same_file()
            self._write(rows, append=True)
        self.written += len(rows)
        return len(rows)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _check_same_file(self) -> None:
        """The file must still be the one :meth:`create` made: GDAL would append to a new file in its place (the
        folder removed and made again) without a word, and the features written before would be lost."""
        if self._identity is not None and self._stat() != self._identity:
            self._raise(OSError(f"its temporary file {self.path.name} was removed"))

    def check(self, features: int) -> None:
        """Read the file back: the layer must be there and hold ``features`` features.

        Raises:
            InputError: it does not (the file system lost or refused a write GDAL did not report).
        """
        self._check_same_file()
        try:
            found = pyogrio.read_info(str(self.path), layer=self.layer)["features"]
        except _WRITE_ERRORS as exc:
            self._raise(exc)
        if found != features:
            # e.g. the folder removed and made again mid-run: GDAL appended to a new, empty file
            self._raise(OSError(f"its temporary file {self.path.name} lost features: {features} written, "
                                f"{found} in it"))

    def discard(self) -> list[Path]:
        """Remove the file and its SQLite side files; returns those that could not be removed (read-only)."""
        return remove_quietly(*(f"{self.path}{suffix}" for suffix in ("", "-journal", "-wal", "-shm")))


def check_output(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """An output GeoPackage path must be a .gpkg in an existing writable folder, and not exist unless ``overwrite``."""
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


@contextlib.contextmanager
def atomic_layer(output: Path, crs_wkt: str | None, layer: str = LAYER,
                 fields: dict[str, type] | None = None) -> Iterator[GpkgWriter]:
    """A :class:`GpkgWriter` on ``.NAME.tmp-PID.gpkg`` beside ``output``, renamed onto ``output`` when the block
    ends without error (after reading the file back); on any error, cancel or interrupt the temporary file is
    removed and ``output`` is left as it was.

    Raises:
        InputError: the file system refused a write (one line naming the folder and the cause; on a file system
            turned read-only mid-run the temporary file cannot be removed: the message names it).
    """
    temp = output.absolute().parent / f".{output.name}.tmp-{os.getpid()}.gpkg"
    writer = GpkgWriter(temp, crs_wkt, name=output.name, layer=layer, fields=fields)
    try:
        writer.create()
        yield writer
        writer.check(writer.written)  # GDAL can lose a write on a full disk without a word
        try:
            os.replace(temp, output)
        except OSError as exc:
            raise_write_error(output, exc)
    except BaseException as exc:
        # Errors, Cancelled, KeyboardInterrupt (and SIGTERM, which the CLIs turn into one): no trace.
        left = writer.discard()
        if left and isinstance(exc, InputError):
            raise InputError(f"{exc} (could not remove the temporary file {left[0]})") from exc.__cause__
        raise
