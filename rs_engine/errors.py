"""The one exception type for problems a user can cause (bad file, bad option, bad model), and the one place
that says why writing a file failed (:func:`write_error`).

The CLI turns :class:`InputError` into exit code 2 and prints its message as one line; anything else is a bug
and keeps its traceback (exit code 1).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import NoReturn


class Cancelled(Exception):
    """The run was cancelled (the ``cancel`` event was set); nothing was written. The CLI exits with 130."""


class InputError(Exception):
    """A problem with the user's input, described in one line a GIS analyst understands.

    The message should name the file or option and say what is wrong, e.g.
    ``"scene.tif: not a raster GDAL can read"``.
    """


#: Free space (bytes, as an unprivileged user sees it) under which a write that failed without saying why is put
#: down to a full disk: after a failed write the space left is at most one batch and a journal page or two.
FULL_BYTES = 4 * 1024 * 1024

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large for this file system",
}

#: What GDAL, SQLite and safetensors write when the OS refused a write, mapped to the errno it stands for.
_HINTS = [
    (re.compile(r"no space left|disk is full|database or disk is full", re.I), errno.ENOSPC),
    (re.compile(r"quota", re.I), errno.EDQUOT),
    (re.compile(r"read-only file system|readonly database|read-only database", re.I), errno.EROFS),
    (re.compile(r"permission denied", re.I), errno.EACCES),
    (re.compile(r"file too large", re.I), errno.EFBIG),
]

#: Messages of a write the OS (or SQLite below GDAL) gave up on, whatever the reason: a file-system problem, not a
#: bug in the caller, even when the folder looks fine afterwards.
_IO_MESSAGES = re.compile(
    r"failed to commit|required geopackage tables|not recognized as being in a supported file format|"
    r"unable to open database|database disk image is malformed|disk i/o error|i/o error|failed to execute insert|"
    r"no such file or directory|error while serializing|sqlite3_\w+\(.*\) failed",
    re.I,
)


def write_error(path: str | os.PathLike, exc: BaseException, name: str | None = None) -> InputError | None:
    """Why writing ``path`` failed with ``exc``, as one line naming its folder, or None when ``exc`` is a bug.

    Writers call it on ``OSError`` and on the errors of the libraries below them (pyogrio's ``DataSourceError``,
    ``FeatureError``..., safetensors' ``SafetensorError``), which on a full disk rarely carry an errno: GDAL says
    "Failed to commit transaction" or, opening a GeoPackage it could not finish, "At least one of the required
    GeoPackage tables ... is missing". The cause is, in this order: the errno of ``exc`` (also as ``os error N``
    / ``[Errno N]`` in its text); the folder no longer exists; what the message says (disk full, quota,
    read-only); else the folder as it is now (``os.statvfs``): read-only, not writable, or less than
    :data:`FULL_BYTES` free. Example: ``"/mnt/small: no space left on device while writing out.gpkg"``.

    Args:
        path: the file being written (a temporary file beside the output is fine: see ``name``).
        exc: what the write raised.
        name: the file name the message names (the output's, not its temporary file's); default ``path``'s.

    Returns:
        An :class:`InputError` to raise (``from exc``), or None: ``exc`` is not explained by the file system
        (neither an ``OSError`` nor a write-failure message, and the folder is fine), so it is a bug to re-raise.
    """
    path = Path(path).absolute()
    folder, name = path.parent, name or path.name
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]", text)
        if found:
            code = int(found.group(1) or found.group(2))
    if code not in _CAUSES and not folder.is_dir():
        return InputError(f"{folder}: folder was removed while writing {name}")
    if code not in _CAUSES:
        code = next((c for pattern, c in _HINTS if pattern.search(text)), None) or _folder_problem(folder)
    if code in _CAUSES:
        return InputError(f"{folder}: {_CAUSES[code]} while writing {name}")
    if isinstance(exc, OSError) or _IO_MESSAGES.search(text):
        return InputError(f"{folder}: could not write {name} ({text})")
    return None


def raise_write_error(path: str | os.PathLike, exc: BaseException, name: str | None = None) -> NoReturn:
    """Raise :func:`write_error`'s one-line ``InputError`` (``from exc``), or ``exc`` itself when it is a bug.

    For the ``except`` clause of every writer, so each says ``except (OSError, ...) as exc: raise_write_error(path,
    exc)`` and nothing more.
    """
    error = write_error(path, exc, name)
    if error is None:
        raise exc
    raise error from exc


def _folder_problem(folder: Path) -> int | None:
    """The errno that the folder's state explains a failed write by (read-only, not writable, full), or None."""
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        return exc.errno
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if not os.access(folder, os.W_OK | os.X_OK):
        return errno.EACCES
    if st.f_bavail * st.f_frsize < FULL_BYTES:
        return errno.ENOSPC
    return None


def remove_quietly(*paths: str | os.PathLike) -> list[Path]:
    """Remove files (missing ones are fine); returns those that could not be removed (a read-only file system).

    For cleaning up after a failed write, where a second error must not hide the first.
    """
    left = []
    for p in map(Path, paths):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            left.append(p)
    return left
