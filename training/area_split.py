"""The train/validation split of an annotated area by blocks of pixels (``rs-train finetune --val-fraction``).

Each raster's annotated area is cut by a grid of square blocks aligned to the raster's pixel (0, 0). Blocks are
taken in a seeded random order and put in validation while that brings the validation area closer to the asked
fraction of the area; at least one block goes to validation and at least one stays in training. A region within
a single block is cut at a pixel column instead. Block edges and the cut lie on pixel edges, so every pixel
belongs to exactly one split, and the split depends only on the areas: datasets built with different chip
seeds agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from training.labels import EMPTY, polygonal


def split_by_area(region: BaseGeometry, block: int, val_fraction: float,
                  seed: int | Sequence[int] = 0) -> tuple[BaseGeometry, BaseGeometry]:
    """Cut a region (in pixel coordinates, x = column, y = row) into disjoint train and validation parts.

    Blocks of ``block`` x ``block`` px aligned to pixel (0, 0) go to validation in a seeded random order while
    that brings the validation area closer to ``val_fraction`` of the region's area (at least one block, never
    all). A region within a single block is cut at a pixel column instead: the eastern part with
    ``val_fraction`` of the area is validation.

    Returns:
        ``(train, val)``: ``train = region - val``; ``val`` is empty when ``val_fraction <= 0``.
    """
    if region.is_empty or val_fraction <= 0:
        return region, EMPTY
    x0, y0, x1, y1 = region.bounds
    cells = np.array([
        shapely.box(i * block, j * block, (i + 1) * block, (j + 1) * block)
        for j in range(math.floor(y0 / block), math.ceil(y1 / block))
        for i in range(math.floor(x0 / block), math.ceil(x1 / block))
    ], dtype=object)
    areas = shapely.area(shapely.intersection(cells, region))
    cells, areas = cells[areas > 0], areas[areas > 0]
    target = val_fraction * float(areas.sum())
    if len(cells) >= 2:
        order = np.random.default_rng(seed).permutation(len(cells))
        chosen: list[int] = []
        total = 0.0
        for k in order:
            if len(chosen) == len(cells) - 1:
                break
            if abs(total + areas[k] - target) < abs(total - target):
                chosen.append(int(k))
                total += areas[k]
        val = shapely.intersection(region, shapely.union_all(cells[chosen or [int(order[0])]]))
    else:
        lo, hi = x0, x1  # bisection for the column with ``target`` area east of it
        for _ in range(50):
            mid = (lo + hi) / 2
            if shapely.intersection(region, shapely.box(mid, y0, x1, y1)).area > target:
                lo = mid
            else:
                hi = mid
        cut = round((lo + hi) / 2)
        val = shapely.intersection(region, shapely.box(cut, y0 - 1, x1 + 1, y1 + 1))
    val = polygonal(val) or EMPTY
    train = polygonal(shapely.difference(region, val)) or EMPTY
    return train, val
