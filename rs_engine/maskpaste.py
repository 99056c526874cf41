"""RoI masks -> tile pixels, one box window at a time, in numpy (no PyTorch).

The exported graphs (``rs-engine export``) return each detection's mask as the mask head made it, (M, M) cells in
its box's frame (``roi_masks``), and the engine pastes it here into the window of tile pixels its box reaches. A
full-tile (T, T) float plane per detection, as torchvision returns, costs 1 MB at 512 px whatever the object's
size, and a runtime keeps the buffers of the densest tile it has seen, so peak memory grew with the raster (the
densest tile of a larger mosaic holds more objects; docs/benchmarks.md 2b). A window costs the box's area.

The arithmetic is :func:`rs_engine.models.paste.paste_masks` (continuous box coordinates, bilinear tent weights,
two matrix products), restricted to the pixels whose weights are not all zero: inside the window the values are
the same up to float summation order, outside it both are exactly 0.
"""

from __future__ import annotations

import math

import numpy as np


def _tent_weights(lo: float, hi: float, first: int, stop: int, cells: int) -> np.ndarray:
    """(stop - first, cells) float32 bilinear weights of pixels first..stop-1 on the cells of [lo, hi]."""
    pixels = np.arange(first, stop, dtype=np.float32)
    extent = np.float32(max(hi - lo, 1e-3))  # a degenerate box still gets finite weights, as paste_masks
    u = (pixels - np.float32(lo)) / extent * np.float32(cells) - np.float32(0.5)
    return np.clip(1 - np.abs(u[:, None] - np.arange(cells, dtype=np.float32)[None, :]), 0, None)


def _support(lo: float, hi: float, cells: int, size: int) -> tuple[int, int]:
    """Pixels [first, stop) within ``size`` where some cell's tent weight may be nonzero (one pixel of margin)."""
    half_cell = 0.5 * max(hi - lo, 1e-3) / cells  # the weights reach half a cell beyond the box on each side
    first = min(size, max(0, math.floor(lo - half_cell) - 1))
    stop = min(size, math.ceil(hi + half_cell) + 2)
    return first, max(first, stop)


def paste_window(mask: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """Paste one RoI mask into the tile window its box reaches.

    Args:
        mask: (M, M) or (1, M, M) mask probabilities in the box's frame (the mask head's output after sigmoid).
        box: (4,) x1 y1 x2 y2 in tile pixels (float).
        size: (H, W) of the tile in pixels.

    Returns:
        ``(window, row0, col0)``: (h, w) float32 probabilities for tile rows row0..row0+h-1 and columns
        col0..col0+w-1; every tile pixel outside the window is 0. h or w is 0 for a box wholly outside the tile.

    Raises:
        ValueError: a mask that is not square.
    """
    mask = np.asarray(mask, dtype=np.float32)
    mask = mask.reshape(mask.shape[-2:])
    m = mask.shape[-1]
    if mask.shape[0] != m:
        raise ValueError(f"RoI mask of shape {mask.shape}: expected (M, M)")
    x0, y0, x1, y1 = (float(v) for v in box)
    r0, r1 = _support(y0, y1, m, int(size[0]))
    c0, c1 = _support(x0, x1, m, int(size[1]))
    wy = _tent_weights(y0, y1, r0, r1, m)  # (h, M)
    wx = _tent_weights(x0, x1, c0, c1, m)  # (w, M)
    return (wy @ mask) @ wx.T, r0, c0
