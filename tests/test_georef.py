"""Polygons land on the right map coordinates: projected, geographic, non-square, rotated, no georeferencing,
resampled to the model GSD, restricted to an extent, and several inputs in different CRSs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_geom
from shapely import affinity
from shapely.geometry import box, mapping, shape

from rs_engine.pipeline import SegmentOptions, segment
from rs_engine.raster import pixel_size_m
from rs_engine.tiling import plan_tiles

BACKGROUND, CLASS1 = 10, 100
# An object crossing tile edges (tile 64, overlap 16): rows 30-50, columns 40-100 of a 120 x 140 raster.
ROWS, COLS = (30, 50), (40, 100)


def scene(
    h: int = 120, w: int = 140, rows: tuple[int, int] = ROWS, cols: tuple[int, int] = COLS
) -> np.ndarray:
    data = np.full((h, w), BACKGROUND, np.uint8)
    data[rows[0] : rows[1], cols[0] : cols[1]] = CLASS1
    return data


def expected(
    transform: Affine, rows: tuple[int, int] = ROWS, cols: tuple[int, int] = COLS
) -> shapely.Geometry:
    """The object's pixel box mapped through ``transform`` (a parallelogram for rotated rasters)."""
    t = transform
    return affinity.affine_transform(box(cols[0], rows[0], cols[1], rows[1]), [t.a, t.b, t.d, t.e, t.c, t.f])


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return a.intersection(b).area / a.union(b).area


def run(path, tmp_path, predictor, card, **options):
    out = tmp_path / "out.gpkg"
    result = segment([path], out, SegmentOptions(**options), predictor=predictor, card=card)
    return result, out


@pytest.mark.parametrize(
    ("name", "transform", "crs"),
    [
        ("projected 0.5 m", Affine(0.5, 0, 733_601.0, 0, -0.5, 3_725_139.0), "EPSG:32616"),
        ("geographic", Affine(1e-5, 0, -84.39, 0, -1e-5, 33.75), "EPSG:4326"),
        ("non-square pixels", Affine(0.5, 0, 733_601.0, 0, -1.0, 3_725_139.0), "EPSG:32616"),
        (
            "rotated 30 degrees",
            Affine.translation(593_124.0, 5_749_208.0) * Affine.rotation(30) * Affine.scale(0.5, -0.5),
            "EPSG:32631",
        ),
        ("south-up", Affine(0.5, 0, 733_601.0, 0, 0.5, 3_725_000.0), "EPSG:32616"),
    ],
)
def test_polygon_lands_on_map(
    name, transform, crs, write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    path = write_raster(scene(), transform=transform, crs=crs)
    result, out = run(path, tmp_path, label_predictor(), make_card())
    info, rows = read_gpkg(out)
    assert info["crs"] == crs
    assert info["geometry_type"] == "MultiPolygon"
    assert len(rows) == 1, name
    truth = expected(transform)
    geometry = rows[0]["geometry"]
    assert iou(geometry, truth) > 0.999, name
    assert rows[0]["area"] == pytest.approx(truth.area, rel=1e-6)
    assert geometry.hausdorff_distance(truth) < 1e-3 * abs(transform.a or transform.b)  # vertices in place


def test_no_georeferencing_gives_qgis_pixel_frame(
    write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    path = write_raster(scene(), transform=None, crs=None)
    _, out = run(path, tmp_path, label_predictor(), make_card())
    info, rows = read_gpkg(out)
    assert info["crs"] is None
    assert len(rows) == 1
    # x = column, y = -row
    assert rows[0]["geometry"].equals(box(COLS[0], -ROWS[1], COLS[1], -ROWS[0]))


def test_plain_png_without_georeferencing(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    data = np.stack([scene()] * 3)
    path = write_raster(data, name="photo.png", transform=None, crs=None, driver="PNG")
    _, out = run(path, tmp_path, label_predictor(), make_card(bands=3))
    info, rows = read_gpkg(out)
    assert info["crs"] is None
    assert [r["source"] for r in rows] == ["photo.png"]
    assert rows[0]["geometry"].equals(box(COLS[0], -ROWS[1], COLS[1], -ROWS[0]))


@pytest.mark.parametrize(("pixel", "gsd"), [(0.25, 0.5), (1.0, 0.5), (0.125, 0.5)])
def test_resampling_to_model_gsd_keeps_map_position(
    pixel, gsd, write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    h, w, rows, cols = 200, 240, (40, 80), (60, 160)  # even numbers: pixel edges survive a 2x/4x resampling
    transform = Affine(pixel, 0, 733_601.0, 0, -pixel, 3_725_139.0)
    path = write_raster(scene(h, w, rows, cols), transform=transform)
    card = make_card(gsd=gsd, tile_size=64, overlap=16)
    result, out = run(path, tmp_path, label_predictor(), card)
    _, found = read_gpkg(out)
    assert len(found) == 1
    assert iou(found[0]["geometry"], expected(transform, rows, cols)) > 0.95
    # The model saw a grid at its own GSD: fewer (or more) tiles than at the raster's resolution.
    grid = round(w * pixel / gsd), round(h * pixel / gsd)
    assert result.tiles == len(plan_tiles(*grid, 64, 16))


def test_no_resampling_within_factor_or_when_disabled(write_raster, make_card, label_predictor, tmp_path):
    transform = Affine(0.4, 0, 733_601.0, 0, -0.4, 3_725_139.0)
    path = write_raster(scene(), transform=transform)
    result, _ = run(path, tmp_path, label_predictor(), make_card(gsd=0.5))  # 0.4 vs 0.5: within 1.5
    assert result.tiles == 9
    path = write_raster(scene(), name="fine.tif", transform=Affine(0.1, 0, 0, 0, -0.1, 0))
    result, _ = run(path, tmp_path, label_predictor(), make_card(gsd=0.5), resample=False, overwrite=True)
    assert result.tiles == 9


def test_pixel_size_in_metres():
    assert pixel_size_m(CRS.from_epsg(32616), Affine(0.5, 0, 0, 0, -1.0, 0), 10, 10) == (0.5, 1.0)
    # US survey feet
    x, y = pixel_size_m(CRS.from_epsg(2277), Affine(1.0, 0, 2e6, 0, -1.0, 1e7), 10, 10)
    assert x == pytest.approx(0.3048, rel=1e-4)
    # Geographic at 60 degrees north: a degree of longitude is half as long as one of latitude.
    x, y = pixel_size_m(CRS.from_epsg(4326), Affine(1e-5, 0, 10.0, 0, -1e-5, 60.0), 2, 2)
    assert y == pytest.approx(1.112, rel=1e-2) and x == pytest.approx(
        y * math.cos(math.radians(60)), rel=1e-3
    )
    assert pixel_size_m(None, Affine.identity(), 10, 10) is None


def test_extent_restricts_output(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    transform = Affine(0.5, 0, 733_600.0, 0, -0.5, 3_725_100.0)
    data = scene(rows=(10, 30), cols=(10, 40))
    data[60:90, 80:130] = CLASS1  # a second object, which the extent cuts in half
    path = write_raster(data, transform=transform)
    # x from column 0 to column 105, y from row 100 up to row 50 (map y decreases with rows)
    x0, y1 = transform * (0, 50)
    x1, y0 = transform * (105, 100)
    _, out = run(path, tmp_path, label_predictor(), make_card(), extent=(x0, y0, x1, y1))
    _, rows = read_gpkg(out)
    assert len(rows) == 1
    assert rows[0]["geometry"].equals(expected(transform, (60, 90), (80, 105)))
    minx, miny, maxx, maxy = rows[0]["geometry"].bounds
    assert x0 <= minx and maxx <= x1 and y0 <= miny and maxy <= y1


def test_inputs_in_different_crs_are_reprojected_to_the_first(
    write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    first = write_raster(scene(), name="a.tif", transform=Affine(0.5, 0, 733_601.0, 0, -0.5, 3_725_139.0))
    t2 = Affine(0.5, 0, 265_000.0, 0, -0.5, 3_737_000.0)
    second = write_raster(scene(), name="b.tif", transform=t2, crs="EPSG:32617")
    out = tmp_path / "out.gpkg"
    segment([first, second], out, predictor=label_predictor(), card=make_card())
    info, rows = read_gpkg(out)
    assert info["crs"] == "EPSG:32616"
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {"a.tif", "b.tif"}
    truth = shape(transform_geom("EPSG:32617", "EPSG:32616", mapping(expected(t2))))
    assert iou(by_source["b.tif"]["geometry"], truth) > 0.99
    assert by_source["b.tif"]["area"] == pytest.approx(by_source["b.tif"]["geometry"].area)


def test_simplify_in_map_units(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    yy, xx = np.mgrid[:120, :140]
    data = np.where((yy - 60) ** 2 + (xx - 64) ** 2 <= 30**2, CLASS1, BACKGROUND).astype(np.uint8)
    path = write_raster(data)
    _, out = run(path, tmp_path, label_predictor(), make_card())
    exact = read_gpkg(out)[1][0]["geometry"]
    _, out = run(path, tmp_path, label_predictor(), make_card(), simplify=1.0, overwrite=True)
    simple = read_gpkg(out)[1][0]["geometry"]
    assert simple.is_valid and shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(exact) / 3
    assert exact.hausdorff_distance(simple) <= 1.0 + 1e-9  # the tolerance, in metres
