"""The one exception type for problems a user can cause (bad file, bad option, bad model).

The CLI turns :class:`InputError` into exit code 2 and prints its message as one line; anything else is a bug
and keeps its traceback (exit code 1).
"""


class InputError(Exception):
    """A problem with the user's input, described in one line a GIS analyst understands.

    The message should name the file or option and say what is wrong, e.g.
    ``"scene.tif: not a raster GDAL can read"``.
    """
