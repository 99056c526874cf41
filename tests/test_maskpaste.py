"""Box-window mask pasting (rs_engine.maskpaste): the same values as the full-tile paste the models were evaluated
with, and the same instances through tile_instances, at the cost of each box's area instead of a tile per mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rs_engine.maskpaste import paste_window
from rs_engine.models.paste import paste_masks
from rs_engine.postprocess import tile_instances
from rs_engine.tiling import plan_tiles

T = 128


def _boxes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Boxes of every kind: inside, across the tile edges, thin, degenerate, wholly outside."""
    x0, y0 = rng.uniform(-30, T, n), rng.uniform(-30, T, n)
    w, h = rng.uniform(0.5, 80, n), rng.uniform(0.5, 80, n)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], 1).astype(np.float32)
    boxes[0] = (40.0, 40.0, 40.0, 41.0)  # zero width
    boxes[1] = (T + 5.0, 3.0, T + 30.0, 20.0)  # wholly right of the tile
    boxes[2] = (0.0, 0.0, float(T), float(T))  # the whole tile
    return boxes


def test_window_is_the_full_paste_inside_and_zero_outside():
    rng = np.random.default_rng(0)
    boxes = _boxes(200, rng)
    masks = rng.random((len(boxes), 1, 28, 28), dtype=np.float32)
    full = paste_masks(torch.from_numpy(masks), torch.from_numpy(boxes), (T, T))[:, 0].numpy()
    for k in range(len(boxes)):
        window, r0, c0 = paste_window(masks[k], boxes[k], (T, T))
        h, w = window.shape
        assert window.dtype == np.float32 and 0 <= r0 and r0 + h <= T and 0 <= c0 and c0 + w <= T
        np.testing.assert_allclose(window, full[k, r0:r0 + h, c0:c0 + w], atol=2e-6)
        outside = full[k].copy()
        outside[r0:r0 + h, c0:c0 + w] = 0
        assert not outside.any(), k  # the window holds every nonzero value
        bw, bh = boxes[k, 2] - boxes[k, 0], boxes[k, 3] - boxes[k, 1]
        assert window.size <= (bw * 29 / 28 + 5) * (bh * 29 / 28 + 5)  # the box's area, and half a cell around
    assert paste_window(masks[1], boxes[1], (T, T))[0].size == 0
    with pytest.raises(ValueError, match="expected"):
        paste_window(np.zeros((28, 14), np.float32), boxes[2], (T, T))


def test_tile_instances_same_from_roi_masks_as_from_full_masks():
    """Blob-like RoI masks (what a mask head makes) through both forms: the same polygons, classes and scores."""
    rng = np.random.default_rng(1)
    boxes = _boxes(60, rng)
    yy, xx = np.mgrid[0:28, 0:28]
    blobs = []
    for _ in range(len(boxes)):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 14)
        blobs.append(1 / (1 + np.exp(((yy - cy) ** 2 + (xx - cx) ** 2 - r * r) / (2 * r))))
    roi = np.stack(blobs)[:, None].astype(np.float32)
    labels = rng.integers(1, 4, len(boxes))
    scores = rng.uniform(0.2, 1, len(boxes)).astype(np.float32)
    full = paste_masks(torch.from_numpy(roi), torch.from_numpy(boxes), (T, T)).numpy()
    plan = plan_tiles(300, 300, T, 32)
    tile = next(t for t in plan.tiles if all(t.interior))  # a middle tile: every edge is interior
    valid = np.ones((T, T), bool)
    valid[:, 100:] = False  # nodata on the right
    a = tile_instances({"labels": labels, "scores": scores, "masks": full}, tile, valid, 0.5)
    b = tile_instances({"labels": labels, "scores": scores, "boxes": boxes, "roi_masks": roi}, tile, valid, 0.5)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        assert (x.class_id, x.score, x.complete, x.central) == (y.class_id, y.score, y.complete, y.central)
        assert x.full.symmetric_difference(y.full).area <= 2, x.full.symmetric_difference(y.full).area
    with pytest.raises(ValueError, match="neither masks nor roi_masks"):
        tile_instances({"labels": labels, "scores": scores, "boxes": boxes}, tile, valid, 0.5)
