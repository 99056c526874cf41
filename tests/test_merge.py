"""Cross-tile merging through the real pipeline: every object exactly once and whole, for several tilings.

Scenes hold known objects (rectangles, discs, an L, a ring with a hole, a bar longer than a tile; two classes)
placed across tile edges, across tile corners (4 tiles), inside overlaps and inside tiles, plus random ones.
A deterministic stand-in predictor labels blobs per tile; :func:`segment` does the tiling, merging,
vectorising and writing; the GeoPackage is read back and compared with the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
from affine import Affine
from rasterio import features
from scipy import ndimage
from shapely.geometry import MultiPolygon, box, shape

from rs_engine.pipeline import SegmentOptions, segment
from rs_engine.postprocess import TileMerger, tile_instances
from rs_engine.tiling import plan_tiles

BACKGROUND, CLASS1, CLASS2 = 10, 100, 200
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)
TILINGS = [(64, 16), (96, 32), (128, 0), (64, 0), (72, 20), (64, 40)]


def rect(h: int, w: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0 : y0 + height, x0 : x0 + width] = True
    return mask


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r**2


def ell(h: int, w: int, y0: int, x0: int, size: int, thick: int) -> np.ndarray:
    return rect(h, w, y0, x0, size, thick) | rect(h, w, y0 + size - thick, x0, thick, size)


def ring(h: int, w: int, y0: int, x0: int, size: int, thick: int) -> np.ndarray:
    inner = rect(h, w, y0 + thick, x0 + thick, size - 2 * thick, size - 2 * thick)
    return rect(h, w, y0, x0, size, size) & ~inner


class Scene:
    """A synthetic raster with known objects, laid out against a tile plan."""

    def __init__(self, tile: int, overlap: int, seed: int = 0):
        self.h, self.w = 3 * tile + 18, 3 * tile + 44
        self.plan = plan_tiles(self.w, self.h, tile, overlap)
        self.occupied = np.zeros((self.h, self.w), bool)
        self.objects: list[tuple[np.ndarray, int, str]] = []
        h, w, t = self.h, self.w, tile
        xs, ys = self.plan.col_offsets, self.plan.row_offsets
        core_x1, core_y1 = self.plan.tiles[0].core[2:]
        last_core = self.plan.tiles[-1].core
        deliberate = [
            (rect(h, w, 2, 3, 6, w - 6), 2, "bar longer than a tile"),
            (disc(h, w, core_y1, core_x1, 9), 1, "disc on a 4-core corner"),
            (rect(h, w, t - 7, xs[1] + t - 7, 14, 14), 2, "square on a tile corner"),
            (ell(h, w, ys[2] + 4, t - 11, 24, 7), 1, "L across a vertical tile edge"),
            (ring(h, w, ys[1] + t - 11, xs[-2] - 10, 24, 6), 1, "ring across a horizontal tile edge"),
            (rect(h, w, 14, xs[2] - 6, 12, 16), 2, "rectangle across a tile's left edge"),
            (
                rect(
                    h,
                    w,
                    (last_core[1] + last_core[3]) // 2 - 5,
                    (last_core[0] + last_core[2]) // 2 - 6,
                    10,
                    12,
                ),
                1,
                "inside a core",
            ),
        ]
        if overlap >= 10:
            deliberate.append((rect(h, w, ys[1] + t // 2 - 3, xs[-1] + 2, 6, 6), 1, "inside an overlap"))
        for mask, class_id, kind in deliberate:
            assert self.place(mask, class_id, kind), f"scene layout: {kind} collides (tile {tile})"
        rng = np.random.default_rng(seed)
        for _ in range(h * w // 600):
            kind = rng.choice(["rect", "disc", "ell", "ring"])
            y, x = int(rng.integers(0, h - 30)), int(rng.integers(0, w - 30))
            if kind == "rect":
                mask = rect(h, w, y, x, int(rng.integers(4, 28)), int(rng.integers(4, 28)))
            elif kind == "disc":
                mask = disc(h, w, y + 14, x + 14, float(rng.uniform(3, 13)))
            elif kind == "ell":
                mask = ell(h, w, y, x, int(rng.integers(12, 28)), int(rng.integers(3, 7)))
            else:
                mask = ring(h, w, y, x, int(rng.integers(14, 28)), int(rng.integers(3, 6)))
            self.place(mask, int(rng.integers(1, 3)), str(kind))

    def place(self, mask: np.ndarray, class_id: int, kind: str) -> bool:
        """Add an object unless it comes within 2 px of another (distinct blobs for the predictor)."""
        if (ndimage.binary_dilation(mask, iterations=2) & self.occupied).any():
            return False
        self.occupied |= mask
        self.objects.append((mask, class_id, kind))
        return True

    @property
    def data(self) -> np.ndarray:
        data = np.full((self.h, self.w), BACKGROUND, np.uint8)
        for mask, class_id, _ in self.objects:
            data[mask] = CLASS1 if class_id == 1 else CLASS2
        return data

    def truth(self, transform: Affine = TRANSFORM) -> list[tuple[MultiPolygon, int, str]]:
        """Objects as map-coordinate MultiPolygons (exact pixel outlines), class and kind."""
        out = []
        for mask, class_id, kind in self.objects:
            parts = [
                shape(g) for g, _ in features.shapes(mask.astype(np.uint8), mask=mask, transform=transform)
            ]
            out.append((MultiPolygon(parts), class_id, kind))
        return out

    def coverage(self) -> dict[str, int]:
        """How many objects cross interior tile edges, span 4 cores, lie inside an overlap only."""
        cores = [box(*t.core) for t in self.plan.tiles]
        tiles = [box(t.x0, t.y0, t.x0 + t.size, t.y0 + t.size) for t in self.plan.tiles]
        counts = {"cut by a tile edge": 0, "on 4 cores": 0, "inside an overlap": 0}
        for mask, _, _ in self.objects:
            rows, cols = np.nonzero(mask)
            obj = box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            inside = [t for t in tiles if t.contains(obj)]
            counts["cut by a tile edge"] += any(t.intersects(obj) and not t.contains(obj) for t in tiles)
            counts["on 4 cores"] += sum(c.intersection(obj).area > 0 for c in cores) >= 4
            counts["inside an overlap"] += len(inside) >= 2
        return counts


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return a.intersection(b).area / a.union(b).area


def match(truth: list[tuple[MultiPolygon, int, str]], rows: list[dict]) -> list[tuple[int, float, dict]]:
    """For each output row, the best-matching truth index and IoU."""
    out = []
    for row in rows:
        scores = [iou(row["geometry"], t[0]) if row["geometry"].intersects(t[0]) else 0.0 for t in truth]
        best = int(np.argmax(scores))
        out.append((best, scores[best], row))
    return out


@pytest.mark.parametrize(("tile", "overlap"), TILINGS)
def test_every_object_once_and_whole(
    tile, overlap, write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    scene = Scene(tile, overlap)
    coverage = scene.coverage()
    assert coverage["cut by a tile edge"] >= 5 and coverage["on 4 cores"] >= 1, coverage
    if overlap >= 10:
        assert coverage["inside an overlap"] >= 1, coverage
    raster = write_raster(scene.data)
    out = tmp_path / "out.gpkg"
    result = segment(
        [raster],
        out,
        SegmentOptions(),
        predictor=label_predictor(),
        card=make_card(tile_size=tile, overlap=overlap),
    )
    _, rows = read_gpkg(out)
    truth = scene.truth()
    matches = match(truth, rows)
    found = sorted(m[0] for m in matches)
    missing = [truth[i][2] for i in set(range(len(truth))) - set(found)]
    duplicated = [truth[i][2] for i in set(found) if found.count(i) > 1]
    assert not missing and not duplicated, f"missing {missing}, duplicated {duplicated}"
    assert result.features == len(rows) == len(truth)
    for index, score, row in matches:
        geometry, class_id, kind = truth[index]
        assert score >= 0.95, f"{kind}: IoU {score:.3f}"
        assert row["class_id"] == class_id, kind
        assert len(row["geometry"].geoms) == len(geometry.geoms) == 1, f"{kind} in pieces"
        assert row["area"] == pytest.approx(geometry.area)
        assert row["score"] == pytest.approx(0.9)


@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (64, 0)])
def test_hole_kept_and_no_convex_hull(
    tile, overlap, write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    scene = Scene(tile, overlap)
    out = tmp_path / "out.gpkg"
    segment(
        [write_raster(scene.data)],
        out,
        predictor=label_predictor(),
        card=make_card(tile_size=tile, overlap=overlap),
    )
    _, rows = read_gpkg(out)
    truth = scene.truth()
    by_kind = {truth[i][2]: (row, truth[i][0]) for i, _, row in match(truth, rows)}
    ring_row, _ = by_kind["ring across a horizontal tile edge"]
    assert len(ring_row["geometry"].geoms[0].interiors) == 1
    ell_row, ell_truth = by_kind["L across a vertical tile edge"]
    assert iou(ell_truth, ell_truth.convex_hull) < 0.8  # so the next line would catch a hull
    assert iou(ell_row["geometry"], ell_truth) >= 0.99


@pytest.mark.parametrize("overlap", [8, 16, 32])
def test_touching_objects_across_the_seam_stay_apart(
    overlap, write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    """Two objects of different classes touching exactly on the core boundary: two features, not one."""
    h, w, tile = 60, 120, 64
    plan = plan_tiles(w, h, tile, overlap)
    seam = plan.tiles[0].core[2]
    data = np.full((h, w), BACKGROUND, np.uint8)
    data[20:40, seam - 14 : seam] = CLASS1
    data[20:40, seam : seam + 14] = CLASS2
    out = tmp_path / "out.gpkg"
    segment(
        [write_raster(data)],
        out,
        predictor=label_predictor(),
        card=make_card(tile_size=tile, overlap=overlap),
    )
    _, rows = read_gpkg(out)
    assert sorted(r["class_id"] for r in rows) == [1, 2]
    for row in rows:
        assert row["area"] == pytest.approx(20 * 14 * 0.25)


def test_complete_view_wins_over_seam(make_card):
    """Two overlapping tiles see one object slightly differently: one object, one tile's view, no seam."""
    plan = plan_tiles(112, 40, 64, 16)  # tiles at x 0 and 48; core boundary at 56
    left, right = plan.tiles
    valid = np.ones((64, 64), bool)

    def prediction(y0: int, x0: int, x1: int, tile_x0: int) -> dict:
        mask = np.zeros((1, 1, 64, 64), np.float32)
        mask[0, 0, y0 : y0 + 10, x0 - tile_x0 : x1 - tile_x0] = 1
        return {"labels": np.array([1]), "scores": np.array([0.9]), "masks": mask}

    merger = TileMerger(plan)
    objects = merger.add(left, tile_instances(prediction(10, 50, 62, 0), left, valid, 0.5))
    objects += merger.add(right, tile_instances(prediction(11, 50, 63, 48), right, valid, 0.5))
    objects += merger.finish()
    assert len(objects) == 1
    # The right tile's view is central (bbox centre 56.5 lies in its core), so it wins whole: no step at x=56.
    assert objects[0].geometry.equals(box(50, 11, 63, 21))


def test_objects_stream_out_row_by_row(label_predictor):
    """Objects above a finished tile row are emitted before the end, and pending state stays small."""
    scene = Scene(64, 16)
    plan = scene.plan
    predictor = label_predictor()
    data = scene.data.astype(np.float32)
    merger = TileMerger(plan)
    early, pending_max = 0, 0
    for tile in plan.tiles:
        window = np.zeros((64, 64), np.float32)
        crop = data[tile.y0 : tile.y0 + 64, tile.x0 : tile.x0 + 64]
        window[: crop.shape[0], : crop.shape[1]] = crop
        pred = predictor([torch.from_numpy(window)[None]])[0]
        early += len(merger.add(tile, tile_instances(pred, tile, np.ones((64, 64), bool), 0.5)))
        pending_max = max(pending_max, len(merger._instances))
    late = len(merger.finish())
    assert early > 0 and early + late == len(scene.objects)
    assert pending_max < len(scene.objects)


class JitterPredictor:
    """Like the label predictor, but each tile's masks are shifted by -1, 0 or +1 px (chosen from the tile's
    pixels), so overlapping tiles disagree slightly about every object, as real models do."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, images):
        out = self.inner(images)
        for image, pred in zip(images, out, strict=True):
            shift = int(image.sum().item()) % 3 - 1
            masks = pred["masks"].roll(shift, dims=-1)
            if shift > 0:
                masks[..., :shift] = 0
            elif shift < 0:
                masks[..., shift:] = 0
            pred["masks"] = masks
        return out


@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (96, 32), (64, 0)])
def test_disagreeing_views_still_give_each_object_once(
    tile, overlap, write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    scene = Scene(tile, overlap, seed=1)
    out = tmp_path / "out.gpkg"
    segment(
        [write_raster(scene.data)],
        out,
        predictor=JitterPredictor(label_predictor()),
        card=make_card(tile_size=tile, overlap=overlap),
    )
    _, rows = read_gpkg(out)
    truth = scene.truth()
    matches = match(truth, rows)
    found = sorted(m[0] for m in matches)
    assert found == list(range(len(truth))), "each object exactly once"
    for index, score, row in matches:
        assert score >= 0.5, f"{truth[index][2]}: IoU {score:.3f}"
        assert len(row["geometry"].geoms) == 1, f"{truth[index][2]} in pieces"
