"""Tile plans and grids: which windows of a raster the model sees, and which pixels each tile is responsible for.

Two pixel frames meet here (see :mod:`rs_engine.raster` for the third, map coordinates):

- *source* pixels: the raster file's own pixel grid (rasterio windows);
- *grid* pixels: the grid the model sees, i.e. the source window of interest (``--extent``) resampled to the
  model's GSD when the raster's differs by more than a factor (:class:`Grid`); identical to source pixels
  when no resampling is needed.

A plan's tiles overlap; their *cores* partition the grid, which is what lets the merge
(:mod:`rs_engine.postprocess`) keep every object exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from affine import Affine
from rasterio.windows import Window

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
