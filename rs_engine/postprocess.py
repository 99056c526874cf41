"""Masks -> instances across tiles -> polygons in map coordinates.

Merging across tiles (:class:`TileMerger`) is what makes tiled inference usable: an object cut by a tile edge,
or seen by two overlapping tiles, must come out exactly once and whole. The method:

1. Each tile's instance masks are thresholded, cleared on nodata/padding pixels and vectorised (holes
   kept, never hulls) into the global *grid* pixel frame (:func:`tile_instances`). An instance is *complete*
   when its mask stays clear of every interior tile edge (the tile saw all of it), else it is a *fragment*.
2. Ownership: tile cores (each overlap split down its middle) partition the grid; every instance is clipped
   to its own tile's core, giving its *piece*. Pieces of different tiles never overlap, so duplicates from
   overlaps cannot arise; an instance lying wholly in another tile's core has an empty piece and is dropped
   (that tile reports it, and sees it more centrally).
3. Linking: an object crossing a core boundary leaves pieces on both sides. Two pieces of edge-adjacent tiles
   are linked (union-find) when they face each other along at least one pixel of the core boundary (within
   ``seam_gap`` px of it: views of real models disagree by a pixel or two) *and* the two tiles' full masks
   agree in the tiles' shared overlap region (intersection over the smaller area >= ``link_threshold``), so
   two distinct objects that merely touch at the boundary stay apart. With an overlap of 0 the contact along
   the boundary is all there is to go on. Links are class-agnostic.
4. Resolving a group (one object): if any member is complete, the best complete view wins (centre in its own
   core first, then score): geometry = that mask clipped to the cores the group occupies (so it can't
   duplicate anything outside them), class and score from that instance. Otherwise (an object larger than any
   tile view, or overlap 0) the pieces are unioned; class by area-weighted vote, score = area-weighted mean of
   the pieces' scores. Gaps of up to ``seam_gap`` px left between linked pieces are closed, along the core
   boundaries only.
5. Streaming: tiles arrive in row-major order. When a tile row is done, groups with no piece on that row's
   lower core boundary can't grow any more and are emitted, so memory is bounded by about one row of tiles.

All geometry up to :func:`to_map` is in grid pixels with integer vertices, so clipping and unions are exact.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio import features
from rasterio.errors import NotGeoreferencedWarning
from shapely import affinity
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from rs_engine.maskpaste import paste_window
from rs_engine.tiling import Tile, TilePlan

log = logging.getLogger(__name__)
# Vectorising an in-memory mask from a thread other than the main one makes rasterio warn "Dataset has no
# geotransform" (rasterio 1.4's per-thread GDAL error state) although the transform is given and used: noise on
# stderr for every run with concurrent streams. Only that warning, only from rasterio.features, is silenced.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module=r"rasterio\.features")

#: Default intersection-over-smaller-area above which two tiles' masks in their overlap are one object.
LINK_THRESHOLD = 0.3
#: Default distance (px) from an interior tile edge within which a mask counts as cut by the edge.
EDGE_MARGIN = 2
#: Default gap (px) across a core boundary that two pieces may leave and still count as touching.
SEAM_GAP = 2


@dataclass
class Instance:
    """One tile's view of one object, in grid pixels.

    Attributes:
        tile: the tile that predicted it.
        class_id: 1-based class index (``card.class_names[class_id - 1]``).
        score: model confidence, 0-1.
        full: the whole thresholded mask as a MultiPolygon (grid pixels).
        piece: ``full`` clipped to the tile's core (may be empty).
        complete: the mask stays clear of the tile's interior edges, i.e. the tile saw the whole object.
        central: the centre of ``full``'s bounding box lies in the tile's core.
    """

    tile: Tile
    class_id: int
    score: float
    full: MultiPolygon
    piece: BaseGeometry
    complete: bool
    central: bool


@dataclass
class MergedObject:
    """One object after cross-tile merging: a MultiPolygon in grid pixels, its class and score."""

    geometry: MultiPolygon
    class_id: int
    score: float
    parts: int  # tile instances merged into it


def as_multipolygon(geom: BaseGeometry | None) -> MultiPolygon | None:
    """The polygonal parts of ``geom`` (any geometry) as a MultiPolygon; None if it has none."""
    if geom is None or geom.is_empty:
        return None
    parts = [p for p in _polygons(geom) if p.area > 0]
    return MultiPolygon(parts) if parts else None


def _polygons(geom: BaseGeometry) -> Iterator[Polygon]:
    for part in shapely.get_parts(geom):
        if isinstance(part, Polygon):
            yield part
        elif isinstance(part, (MultiPolygon, GeometryCollection)):
            yield from _polygons(part)


def mask_to_geometry(mask: np.ndarray, x0: int = 0, y0: int = 0, min_pixels: int = 1) -> MultiPolygon | None:
    """Vectorise a boolean mask (H, W) with ``rasterio.features.shapes`` (4-connected, holes kept).

    Args:
        mask: (H, W) bool, True on the object.
        x0, y0: grid-pixel position of ``mask[0, 0]``: vertices come out in grid pixels.
        min_pixels: parts smaller than this (pixels) are dropped as speckle.

    Returns:
        MultiPolygon with integer vertices, or None when nothing is left.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    sub = np.ascontiguousarray(mask[r0:r1, c0:c1], dtype=np.uint8)
    transform = Affine.translation(x0 + int(c0), y0 + int(r0))
    shapes = features.shapes(sub, mask=sub.astype(bool), connectivity=4, transform=transform)
    polygons = [p for p in (shape(g) for g, _ in shapes) if p.area >= min_pixels]
    return MultiPolygon(polygons) if polygons else None


def _to_numpy(value: Any) -> np.ndarray:
    """A predictor's array (numpy, or a torch tensor from a caller's own predictor) as numpy, floats as float32."""
    if hasattr(value, "detach"):  # a torch tensor: no torch import needed to recognise one
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def tile_instances(
    prediction: Mapping[str, Any],
    tile: Tile,
    valid: np.ndarray,
    score_threshold: float,
    mask_threshold: float = 0.5,
    min_pixels: int = 4,
    edge_margin: int = EDGE_MARGIN,
) -> list[Instance]:
    """Turn one tile's Mask R-CNN-style prediction into :class:`Instance` s in grid pixels.

    Args:
        prediction: ``labels`` (K,) int 1..num_classes, ``scores`` (K,) 0-1, and the masks either as ``masks``
            (K, 1, T, T) or (K, T, T) float probabilities in tile pixels, or as ``roi_masks`` (K, 1, M, M)
            probabilities in each box's frame with ``boxes`` (K, 4) x1y1x2y2 tile pixels (the exported graphs'
            form, pasted here box by box: :func:`rs_engine.maskpaste.paste_window`).
        tile: the tile predicted.
        valid: (T, T) bool, False on nodata and padding pixels, where masks are cleared.
        score_threshold: instances scoring below are dropped.
        mask_threshold: mask probability above which a pixel belongs to the instance.
        min_pixels: instances (and their disconnected parts) smaller than this many pixels are dropped.
        edge_margin: a mask within this many pixels of an interior tile edge is a fragment, not complete.

    Raises:
        ValueError: masks that don't match the tile size, or neither ``masks`` nor ``roi_masks`` (a predictor bug).
    """
    scores = _to_numpy(prediction["scores"]).reshape(-1)
    labels = _to_numpy(prediction["labels"]).reshape(-1)
    keep = np.flatnonzero(scores >= score_threshold)
    if keep.size == 0:
        return []
    cx0, cy0, cx1, cy1 = tile.core
    core = box(cx0, cy0, cx1, cy1)
    left, top, right, bottom = tile.interior
    m, h, w = edge_margin, valid.shape[0], valid.shape[1]
    out = []
    for k, window, wr, wc in _binary_windows(prediction, keep, valid, mask_threshold):
        rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = wr + int(rows[0]), wr + int(rows[-1]) + 1, wc + int(cols[0]), wc + int(cols[-1]) + 1
        crop = window[r0 - wr:r1 - wr, c0 - wc:c1 - wc]
        if np.count_nonzero(crop) < min_pixels:
            continue
        full = mask_to_geometry(crop, tile.x0 + c0, tile.y0 + r0, min_pixels)
        if full is None:
            continue
        cut = (left and c0 < m) or (top and r0 < m) or (right and c1 > w - m) or (bottom and r1 > h - m)
        minx, miny, maxx, maxy = full.bounds
        centre_x, centre_y = (minx + maxx) / 2, (miny + maxy) / 2
        out.append(
            Instance(
                tile=tile,
                class_id=int(labels[k]),
                score=float(scores[k]),
                full=full,
                piece=full.intersection(core),
                complete=not cut,
                central=cx0 <= centre_x < cx1 and cy0 <= centre_y < cy1,
            )
        )
    return out


def _binary_windows(prediction: Mapping[str, Any], keep: np.ndarray, valid: np.ndarray,
                    mask_threshold: float) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """``(k, binary window, row0, col0)`` for each kept instance: its thresholded mask, cleared where not valid."""
    size = valid.shape
    if "masks" in prediction:  # full-tile planes (a prompt-head model, YOLO, a caller's own predictor)
        masks = _to_numpy(prediction["masks"])
        if tuple(masks.shape[-2:]) != size:
            raise ValueError(f"predictor returned masks of {tuple(masks.shape[-2:])} px for a {size} tile")
        masks = masks.reshape(-1, *size)
        binary = (masks[keep] if keep.size < len(masks) else masks) > mask_threshold  # all at once: vectorised
        binary &= valid
        for i, k in enumerate(keep):
            yield int(k), binary[i], 0, 0
        return
    if "roi_masks" not in prediction:
        raise ValueError(f"predictor returned neither masks nor roi_masks (keys: {sorted(prediction)})")
    roi, boxes = _to_numpy(prediction["roi_masks"]), _to_numpy(prediction["boxes"]).reshape(-1, 4)
    for k in keep:
        window, r0, c0 = paste_window(roi[k], boxes[k], size)
        binary = window > mask_threshold
        binary &= valid[r0:r0 + binary.shape[0], c0:c0 + binary.shape[1]]
        yield int(k), binary, r0, c0


class TileMerger:
    """Merge tile instances into objects, streaming: feed tiles in plan order, collect finished objects.

    See the module docstring for the method. Usage::

        merger = TileMerger(plan)
        for tile in plan.tiles:
            objects += merger.add(tile, instances_of(tile))   # [] for skipped tiles: every tile must be added
        objects += merger.finish()

    Args:
        plan: the tile plan the tiles come from.
        link_threshold: two tiles' masks whose intersection over the smaller area, in the tiles' overlap
            region, reaches this are one object.
        seam_gap: pieces facing each other across a core boundary within this many pixels of it count as
            touching (views of real models disagree by a pixel or two).
        min_pixels: merged objects smaller than this (grid pixels) are dropped.
    """

    def __init__(
        self,
        plan: TilePlan,
        link_threshold: float = LINK_THRESHOLD,
        seam_gap: int = SEAM_GAP,
        min_pixels: int = 4,
    ) -> None:
        self._plan = plan
        self._seam_gap = seam_gap
        self._link_threshold = link_threshold
        self._min_pixels = min_pixels
        self._instances: dict[int, Instance] = {}
        self._parent: dict[int, int] = {}
        self._by_tile: dict[tuple[int, int], list[int]] = {}
        self._next_id = 0

    def add(self, tile: Tile, instances: Sequence[Instance]) -> list[MergedObject]:
        """Add one tile's instances (tiles in plan order); returns the objects finished by this tile."""
        ids = []
        for inst in instances:
            if inst.piece.is_empty or inst.piece.area == 0:
                continue  # lies in another tile's core: that tile reports it
            i = self._next_id
            self._next_id += 1
            self._instances[i] = inst
            self._parent[i] = i
            for j, vertical in self._candidates(inst):
                if self._linked(self._instances[j], inst, vertical):
                    self._union(i, j)
            ids.append(i)
        self._by_tile[(tile.row, tile.col)] = ids
        if tile.col == self._plan.n_cols - 1:
            return self._finish_row(tile.row)
        return []

    def finish(self) -> list[MergedObject]:
        """Emit every object still pending (call after the last tile)."""
        objects = [obj for members in self._groups().values() if (obj := self._resolve(members)) is not None]
        self._instances.clear()
        self._parent.clear()
        self._by_tile.clear()
        return objects

    # -- linking

    def _candidates(self, inst: Instance) -> list[tuple[int, bool]]:
        """Pending instances of the left and upper neighbour tiles whose pieces come within ``seam_gap`` px
        of the shared core edge, each with True for a vertical seam (left neighbour), False for a horizontal
        one."""
        tile, gap = inst.tile, self._seam_gap
        cx0, cy0, _, _ = tile.core
        bx0, by0, _, _ = inst.piece.bounds
        found = []
        if tile.col > 0 and bx0 <= cx0 + gap:
            found += [
                (j, True)
                for j in self._by_tile.get((tile.row, tile.col - 1), [])
                if self._instances[j].piece.bounds[2] >= cx0 - gap
            ]
        if tile.row > 0 and by0 <= cy0 + gap:
            found += [
                (j, False)
                for j in self._by_tile.get((tile.row - 1, tile.col), [])
                if self._instances[j].piece.bounds[3] >= cy0 - gap
            ]
        return found

    def _linked(self, a: Instance, b: Instance, vertical: bool) -> bool:
        """Are ``a`` (left or upper tile) and ``b`` views of one object? See the module docstring, step 3."""
        if not self._contact(a.piece, b.piece, vertical, b.tile.core[0] if vertical else b.tile.core[1]):
            return False
        ta, tb = a.tile, b.tile
        w, h = self._plan.width, self._plan.height
        x0, y0 = max(ta.x0, tb.x0), max(ta.y0, tb.y0)
        x1, y1 = min(ta.x0 + ta.size, tb.x0 + tb.size, w), min(ta.y0 + ta.size, tb.y0 + tb.size, h)
        if x1 <= x0 or y1 <= y0:
            return True  # no overlap (overlap 0): contact across the seam is all the evidence there is
        region = box(x0, y0, x1, y1)
        ra, rb = a.full.intersection(region), b.full.intersection(region)
        smaller = min(ra.area, rb.area)
        if smaller == 0:
            return True
        return ra.intersection(rb).area / smaller >= self._link_threshold

    def _contact(self, a: BaseGeometry, b: BaseGeometry, vertical: bool, seam: int) -> bool:
        """Do pieces ``a`` (before the seam) and ``b`` (after it) face each other along at least one pixel of
        the seam, within ``seam_gap`` px of it? The gap tolerates views that disagree by a pixel or two."""
        gap, w, h = self._seam_gap, self._plan.width, self._plan.height
        if vertical:
            band_a, band_b, lo, hi = box(seam - gap, 0, seam, h), box(seam, 0, seam + gap, h), 1, 3
        else:
            band_a, band_b, lo, hi = box(0, seam - gap, w, seam), box(0, seam, w, seam + gap), 0, 2
        spans_a = [(p.bounds[lo], p.bounds[hi]) for p in _polygons(a.intersection(band_a))]
        spans_b = [(p.bounds[lo], p.bounds[hi]) for p in _polygons(b.intersection(band_b))]
        return any(min(a1, b1) - max(a0, b0) >= 1 for a0, a1 in spans_a for b0, b1 in spans_b)

    def _find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:  # path compression
            self._parent[i], i = root, self._parent[i]
        return root

    def _union(self, i: int, j: int) -> None:
        ri, rj = self._find(i), self._find(j)
        if ri != rj:
            self._parent[max(ri, rj)] = min(ri, rj)

    def _groups(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i in self._instances:
            groups.setdefault(self._find(i), []).append(i)
        return groups

    # -- finishing

    def _finish_row(self, row: int) -> list[MergedObject]:
        """Emit groups no later tile can reach: none of their pieces touches this row's lower core edge."""
        if row == self._plan.n_rows - 1:
            return self.finish()
        line = self._plan.tiles[row * self._plan.n_cols].core[3]
        done: list[MergedObject] = []
        for members in self._groups().values():
            open_below = any(
                (inst := self._instances[i]).tile.row == row and inst.piece.bounds[3] >= line - self._seam_gap
                for i in members
            )
            if open_below:
                continue
            obj = self._resolve(members)
            if obj is not None:
                done.append(obj)
            for i in members:
                del self._instances[i]
                del self._parent[i]
        log.debug("tile row %d done: %d objects finished, %d tile instances pending", row, len(done),
                  len(self._instances))  # fmt: skip
        # Only this row's pending pieces can still be linked (by the next row's tiles).
        self._by_tile = {
            key: [i for i in ids if i in self._instances]
            for key, ids in self._by_tile.items()
            if key[0] == row
        }
        return done

    def _resolve(self, members: Sequence[int]) -> MergedObject | None:
        """One group of linked instances -> one object (module docstring, step 4)."""
        insts = [self._instances[i] for i in members]
        cores = {m.tile.index: box(*m.tile.core) for m in insts}
        completes = [m for m in insts if m.complete]
        if completes:
            best = max(completes, key=lambda m: (m.central, m.score, m.full.area))
            covered = {k for k, core in cores.items() if best.full.intersection(core).area > 0}
            parts = [best.full.intersection(shapely.union_all([cores[k] for k in covered]))]
            parts += [m.piece for m in insts if m.tile.index not in covered]  # what the best view can't see
            geometry = shapely.union_all(parts)
            class_id, score = best.class_id, best.score
        else:
            geometry = shapely.union_all([m.piece for m in insts])
            areas: dict[int, float] = {}
            for m in insts:
                areas[m.class_id] = areas.get(m.class_id, 0.0) + m.piece.area
            class_id = max(areas, key=lambda c: areas[c])
            total = sum(m.piece.area for m in insts)
            score = sum(m.score * m.piece.area for m in insts) / total
        if len(cores) > 1 and shapely.get_num_geometries(geometry) > 1:
            geometry = self._bridge(geometry, list(cores.values()))
        geometry = as_multipolygon(geometry)
        if geometry is None or geometry.area < self._min_pixels:
            return None
        return MergedObject(geometry, class_id, float(score), len(insts))

    def _bridge(self, geometry: BaseGeometry, cores: list[Polygon]) -> BaseGeometry:
        """Close gaps of up to ``seam_gap`` px between pieces of linked views, along core boundaries only.

        A morphological closing (mitre joins keep pixel corners square) is applied, but its result is only
        taken within ``seam_gap`` px of the cores' boundaries, so the shape elsewhere stays pixel-exact.
        """
        gap = self._seam_gap
        closed = geometry.buffer(gap, join_style="mitre").buffer(-gap, join_style="mitre")
        seams = shapely.union_all([core.boundary.buffer(gap, cap_style="square") for core in cores])
        return shapely.union_all([geometry, closed.intersection(seams)])


def to_map(geometry: BaseGeometry, transform: Affine, simplify: float = 0.0) -> MultiPolygon | None:
    """Grid-pixel geometry -> map coordinates (``transform``: grid px -> map), optionally simplified.

    Args:
        geometry: (Multi)Polygon in grid pixels.
        transform: grid pixel (col, row) -> map (x, y), e.g. :attr:`rs_engine.tiling.Grid.transform`.
        simplify: Douglas-Peucker tolerance in map units (topology preserved, made valid after); 0 = off, in
            which case only collinear vertices of the pixel staircase are removed.

    Returns:
        A valid MultiPolygon (exterior rings counter-clockwise), or None if simplification left nothing.
    """
    t = transform
    mapped = affinity.affine_transform(geometry, [t.a, t.b, t.d, t.e, t.c, t.f])
    mapped = shapely.simplify(mapped, simplify, preserve_topology=True)
    if simplify > 0:
        mapped = shapely.make_valid(mapped)
    multi = as_multipolygon(mapped)
    return shapely.orient_polygons(multi) if multi is not None else None
