"""Local annotations (rasters + polygon layer + AOI) as training chips: reading, repair, reprojection, AOI, split."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import torch
from affine import Affine
from pyogrio import raw as ogr_raw
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from scipy import ndimage

from rs_engine.errors import InputError
from training.area_split import split_by_area
from training.augment import AugmentConfig
from training.coco import ChipSpec
from training.labels import load_aoi, load_labels
from training.local import LocalChips

#: 1 m pixels in UTM 31N; pixel (col, row) -> (500000 + col, 5000000 - row). Near lon 3, lat 45.
T = Affine(1.0, 0.0, 500_000.0, 0.0, -1.0, 5_000_000.0)
UTM = "EPSG:32631"
SPACENET = Path(__file__).resolve().parents[3] / "shared" / "data" / "spacenet_samples"
NO_AUG = AugmentConfig(scale_range=(1, 1), gain=0, bias=0, dihedral=False)


def px_box(c0: float, r0: float, c1: float, r1: float) -> shapely.Polygon:
    """Map-coordinate box over pixel columns c0..c1 and rows r0..r1."""
    return shapely.box(T.c + c0, T.f - r1, T.c + c1, T.f - r0)


def write_raster(path: Path, data: np.ndarray | None = None, transform: Affine | None = T,
                 crs: str | None = UTM, nodata: float | None = None) -> Path:
    if data is None:
        data = np.random.default_rng(0).integers(1, 255, (3, 256, 256), dtype=np.uint8)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   tiled=True, blockxsize=64, blockysize=64)
    if transform is not None:
        profile["transform"] = transform
    if crs is not None:
        profile["crs"] = crs
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def write_layer(path: Path, geoms: list, classes: list | None = None, crs: str | None = UTM,
                field: str = "cls", geometry_type: str = "Unknown") -> Path:
    driver = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".shp": "ESRI Shapefile"}[path.suffix]
    wkb = np.array([None if g is None else shapely.to_wkb(g) for g in geoms], dtype=object)
    fields, data = [], []
    if classes is not None:
        values = np.asarray(classes)
        values = values.astype(object) if values.dtype.kind == "U" else values
        fields, data = [field, "note"], [values, np.array(["x"] * len(geoms), dtype=object)]
    ogr_raw.write(path, geometry=wkb, field_data=data, fields=fields, crs=crs, driver=driver,
                  geometry_type=geometry_type)
    return path


def layer_fids(path: Path) -> list[int]:
    return [int(f) for f in ogr_raw.read(path, read_geometry=False, return_fids=True)[1]]


def spec(size: int = 64) -> ChipSpec:
    return ChipSpec(size, [0, 1, 2], [0.0] * 3, [1.0] * 3)


def expected_mask(geom: shapely.Geometry, window: Window) -> np.ndarray:
    return rasterio.features.rasterize([(geom, 1)], out_shape=(int(window.height), int(window.width)),
                                       transform=window_transform(window, T), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- load_labels


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson", ".shp"])
def test_formats(tmp_path: Path, suffix: str) -> None:
    geoms = [px_box(10, 10, 30, 30), px_box(50, 50, 80, 70), px_box(100, 10, 120, 30)]
    path = write_layer(tmp_path / f"labels{suffix}", geoms, ["tree", "car", "tree"], geometry_type="Polygon")
    labels, names = load_labels(path, "cls", CRS.from_string(UTM))
    assert names == ["car", "tree"]
    assert labels.labels == [2, 1, 2]
    assert labels.fids == layer_fids(path)
    for got, want in zip(labels.geometries, geoms, strict=True):
        assert got.symmetric_difference(want).area < 1e-6


def test_numeric_class_field_sorted_numerically(tmp_path: Path) -> None:
    path = write_layer(tmp_path / "l.gpkg", [px_box(0, 0, 5, 5)] * 3, [10, 2, 1])
    labels, names = load_labels(path, "CLS", None)  # field matched ignoring case
    assert names == ["1", "2", "10"] and labels.labels == [3, 2, 1]


def test_repairs_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bowtie = shapely.Polygon([(T.c, T.f), (T.c + 20, T.f - 20), (T.c + 20, T.f), (T.c, T.f - 20)])
    assert not bowtie.is_valid
    geoms = [px_box(0, 0, 10, 10), bowtie, shapely.Polygon(), None, shapely.Point(T.c + 5, T.f - 5)]
    path = write_layer(tmp_path / "l.gpkg", geoms, ["a"] * 5)
    fids = layer_fids(path)
    with caplog.at_level(logging.WARNING, logger="training.labels"):
        labels, _ = load_labels(path, "cls", CRS.from_string(UTM))
    assert labels.fids == [fids[0], fids[1]]
    repaired = labels.geometries[1]
    assert repaired.is_valid and repaired.geom_type == "MultiPolygon" and repaired.area == pytest.approx(200)
    text = caplog.text
    assert f"repaired 1 invalid polygon(s) (feature ids {fids[1]})" in text
    assert f"empty or missing geometry (feature ids {fids[2]}, {fids[3]})" in text
    assert "not polygons (Point)" in text and f"feature ids {fids[4]})" in text


def test_missing_field_and_unknown_class(tmp_path: Path) -> None:
    path = write_layer(tmp_path / "l.geojson", [px_box(0, 0, 5, 5), px_box(9, 9, 20, 20)], ["car", "tree"])
    with pytest.raises(InputError, match=r"no field 'class' \(fields: cls, note\)"):
        load_labels(path, "class", None)
    with pytest.raises(InputError, match="classes the model doesn't know: tree"):
        load_labels(path, "cls", None, class_names=["car", "ship"])
    labels, names = load_labels(path, "cls", None, class_names=["ship", "car", "tree"])
    assert names == ["ship", "car", "tree"] and labels.labels == [2, 3]


def test_missing_or_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_labels(tmp_path / "nope.gpkg", "cls", None)
    (tmp_path / "junk.gpkg").write_text("not a geopackage")
    with pytest.raises(InputError, match="junk.gpkg: not a vector layer"):
        load_labels(tmp_path / "junk.gpkg", "cls", None)
    points = write_layer(tmp_path / "p.gpkg", [shapely.Point(T.c, T.f)], ["a"])
    with pytest.raises(InputError, match="no polygon feature"):
        load_labels(points, "cls", None)
    with pytest.raises(InputError, match="AOI layer has no polygon"):
        load_aoi(points, None)
    raster = write_raster(tmp_path / "r.tif")
    labels = write_layer(tmp_path / "l.gpkg", [px_box(0, 0, 5, 5)], ["a"])
    with pytest.raises(InputError, match="file not found"):
        LocalChips([tmp_path / "missing.tif"], labels, "cls", spec())
    with pytest.raises(InputError, match="file not found"):
        LocalChips([raster], labels, "cls", spec(), aoi=tmp_path / "aoi.gpkg")


# -------------------------------------------------------------------------------------------- reprojection


def test_labels_in_4326_land_on_utm_pixels(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "r.tif")
    square = shapely.segmentize(px_box(100, 60, 140, 100), 2.0)
    xs, ys = rasterio.warp.transform(UTM, "EPSG:4326", *np.asarray(square.exterior.coords).T)
    path = write_layer(tmp_path / "l.geojson", [shapely.Polygon(zip(xs, ys))], ["roof"], crs="EPSG:4326")
    ds = LocalChips([raster], path, "cls", spec(64), train=False)
    window = Window(90, 50, 64, 64)
    _, masks, labels, _ = ds.cut(0, window)
    assert labels.tolist() == [1]
    rows, cols = np.nonzero(masks[0])
    assert abs(cols.min() + 90 - 100) <= 1 and abs(cols.max() + 90 - 139) <= 1
    assert abs(rows.min() + 50 - 60) <= 1 and abs(rows.max() + 50 - 99) <= 1
    assert abs(int(masks[0].sum()) - 1600) < 80


def test_raster_without_crs_and_labels_with_one(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "r.tif", transform=None, crs=None)
    labels = write_layer(tmp_path / "l.gpkg", [px_box(0, 0, 5, 5)], ["a"])
    with pytest.raises(InputError, match="raster has no CRS"):
        LocalChips([raster], labels, "cls", spec())


# ------------------------------------------------------------------------------------------------- chips


def test_masks_match_rasterize_multipolygon_and_outside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raster = write_raster(tmp_path / "r.tif")
    blobs = shapely.MultiPolygon([px_box(10, 10, 20, 20), px_box(40.5, 30.2, 52.7, 45)])
    crossing = px_box(240, 100, 270, 120)  # partly east of the raster
    far = px_box(1000, 1000, 1010, 1010)
    tri = shapely.Polygon([(T.c + 70, T.f - 10), (T.c + 100, T.f - 12), (T.c + 80, T.f - 40)])
    geoms = [blobs, crossing, far, tri]
    path = write_layer(tmp_path / "l.gpkg", geoms, ["a", "a", "b", "b"])
    fids = layer_fids(path)
    aoi = write_layer(tmp_path / "aoi.gpkg", [px_box(0, 0, 256, 256)])
    with caplog.at_level(logging.WARNING, logger="training.labels"):
        ds = LocalChips([raster], path, "cls", spec(64), aoi=aoi, train=False)
    assert f"ignored 1 feature(s) outside every raster (feature ids {fids[2]})" in caplog.text
    assert ds.labelsets[0].fids == [fids[0], fids[1], fids[3]] and ds.num_instances == 3
    window = Window(0, 0, 128, 128)
    _, masks, labels, _ = ds.cut(0, window)
    assert labels.tolist() == [1, 2]  # one instance for the multipolygon, the triangle
    assert ndimage.label(masks[0])[1] == 2
    np.testing.assert_array_equal(masks[0], expected_mask(blobs, window))
    np.testing.assert_array_equal(masks[1], expected_mask(tri, window))
    window = Window(200, 80, 64, 64)  # reaches past the east edge: padding, mask clipped at the raster
    image, masks, labels, valid = ds.cut(0, window)
    assert labels.tolist() == [1] and not valid[:, 56:].any() and (image[:, :, 56:] == 0).all()
    want = expected_mask(crossing, window)
    want[:, 56:] = 0
    np.testing.assert_array_equal(masks[0], want)
    for i in range(len(ds)):  # validation items: shapes and dtypes
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype.is_floating_point
        assert target["masks"].shape[1:] == (64, 64) and len(target["boxes"]) == len(target["labels"])


def test_aoi_masks_pixels_and_centres_chips(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "r.tif")
    aoi_geom = shapely.Polygon([(T.c, T.f), (T.c + 128, T.f), (T.c + 128, T.f - 200), (T.c, T.f - 100)])
    aoi = write_layer(tmp_path / "aoi.shp", [aoi_geom], geometry_type="Polygon")
    geoms = [px_box(20, 20, 40, 40), px_box(110, 50, 150, 70), px_box(200, 200, 220, 220)]
    path = write_layer(tmp_path / "l.gpkg", geoms, ["a", "a", "a"])
    ds = LocalChips([raster], path, "cls", spec(64), aoi=aoi, augment=NO_AUG, chips_per_epoch=40)
    assert ds.regions[0].equals(aoi_geom) and ds.num_instances == 2  # the third object lies outside the AOI
    inside_px = rasterio.features.rasterize([(aoi_geom, 1)], out_shape=(256, 256), transform=T).astype(bool)
    rng = np.random.default_rng(1)
    for _ in range(40):
        r, w = ds.sample_window(rng, 64)
        cx, cy = T * (w.col_off + 32, w.row_off + 32)
        assert aoi_geom.buffer(1.0).contains(shapely.Point(cx, cy))
        image, masks, _, valid = ds.cut(r, w)
        outside = np.ones((64, 64), bool)
        c0, r0 = max(0, w.col_off), max(0, w.row_off)
        c1, r1 = min(256, w.col_off + 64), min(256, w.row_off + 64)
        outside[r0 - w.row_off:r1 - w.row_off, c0 - w.col_off:c1 - w.col_off] = ~inside_px[r0:r1, c0:c1]
        assert (image[:, outside] == 0).all() and not valid[outside].any() and not masks[:, outside].any()
    window = Window(100, 40, 64, 64)  # the second object is cut at the AOI's east edge (column 128)
    _, masks, _, _ = ds.cut(0, window)
    assert len(masks) == 1 and masks[0][:, 28:].sum() == 0 and masks[0].sum() == 18 * 20
    hits = sum(len(ds[i][1]["labels"]) > 0 for i in range(len(ds)))
    assert hits >= len(ds) // 3  # object-biased sampling on a sparse layer
    far = write_layer(tmp_path / "far.gpkg", [px_box(5000, 5000, 5100, 5100)])
    with pytest.raises(InputError, match="AOI does not overlap any raster"):
        LocalChips([raster], path, "cls", spec(64), aoi=far)


def test_default_region_is_label_bbox_plus_half_chip(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "r.tif")
    path = write_layer(tmp_path / "l.gpkg", [px_box(100, 100, 110, 110), px_box(200.5, 150, 210, 160)], ["a", "a"])
    ds = LocalChips([raster], path, "cls", spec(64), train=False)
    assert ds.regions[0].equals(px_box(68, 68, 242, 192))
    ds = LocalChips([raster], path, "cls", spec(64), chips_per_epoch=None)
    assert len(ds) == max(16, int(np.ceil(2 * 174 * 124 / 64**2)))


@pytest.mark.parametrize("size", [32, 128])  # 4 blocks of 128 px; one 512 px block (west/east cut)
def test_split_disjoint_and_covering(tmp_path: Path, size: int) -> None:
    raster = write_raster(tmp_path / "r.tif")
    objects = [px_box(c, r, c + 12, r + 12) for c in range(8, 240, 40) for r in range(8, 240, 40)]
    path = write_layer(tmp_path / "l.gpkg", objects, ["a"] * len(objects))
    aoi = write_layer(tmp_path / "aoi.gpkg", [px_box(0, 0, 256, 256)])
    sets = {split: LocalChips([raster], path, "cls", spec(size), aoi=aoi, split=split, val_fraction=0.25,
                              train=False) for split in ("train", "val", "all")}
    train, val, whole = (sets[s].regions[0] for s in ("train", "val", "all"))
    assert train.intersection(val).area == pytest.approx(0, abs=1e-6)
    assert train.union(val).symmetric_difference(whole).area == pytest.approx(0, abs=1e-6)
    assert 0.2 * whole.area <= val.area <= 0.5 * whole.area
    # A train chip over the whole raster sees nothing of the validation region, pixels or objects.
    image, masks, _, valid = sets["train"].cut(0, Window(0, 0, 256, 256))
    val_px = rasterio.features.rasterize([(val, 1)], out_shape=(256, 256), transform=T).astype(bool)
    assert val_px.any() and not valid[val_px].any() and (image[:, val_px] == 0).all()
    assert not masks[:, val_px].any() and valid[~val_px].all()
    assert all(ds.regions[0].intersects(shapely.box(*rasterio.windows.bounds(w, T))) for ds in sets.values()
               for _, w in ds.windows())
    again = LocalChips([raster], path, "cls", spec(size), aoi=aoi, split="val", val_fraction=0.25, seed=7)
    assert again.regions[0].equals(val)  # the split does not depend on the chip seed
    with pytest.raises(InputError, match="val split is empty"):
        LocalChips([raster], path, "cls", spec(size), aoi=aoi, split="val", val_fraction=0)


def test_split_by_area_blocks() -> None:
    region = shapely.box(0, 0, 1000, 600)
    train, val = split_by_area(region, 100, 0.2, seed=3)
    assert val.area == pytest.approx(0.2 * region.area, rel=0.05)
    assert train.intersection(val).area == 0 and train.area + val.area == pytest.approx(region.area)
    assert np.allclose(np.asarray(val.exterior.coords if val.geom_type == "Polygon" else
                                  shapely.get_coordinates(val)) % 100, 0)  # block edges on the grid
    assert split_by_area(region, 100, 0.0)[1].is_empty


def test_band_statistics_match_numpy(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(1, 4000, (2, 256, 256)).astype(np.uint16)
    data[:, :10, :] = 0  # nodata rows, excluded
    raster = write_raster(tmp_path / "r.tif", data, nodata=0)
    path = write_layer(tmp_path / "l.gpkg", [px_box(60, 5, 90, 40), px_box(150, 170, 180, 200)], ["a", "b"])
    sp = ChipSpec(64, [0, 1], [0.0, 0.0], [1.0, 1.0])
    ds = LocalChips([raster], path, "cls", sp, split="train", val_fraction=0.2, bands=[2, 1])
    region = rasterio.features.rasterize([(ds.regions[0], 1)], out_shape=(256, 256), transform=T).astype(bool)
    pick = region & (data[0] != 0)
    values = data[[1, 0]][:, pick].astype(np.float64)
    mean, std = ds.band_statistics()
    np.testing.assert_allclose(mean, values.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std, values.std(axis=1), rtol=1e-5)
    sub_mean, _ = ds.band_statistics(max_pixels=64 * 64 * 2)  # subset of tiles, same ballpark
    np.testing.assert_allclose(sub_mean, mean, rtol=0.1)
    sp.mean, sp.std = mean, std  # chips use the statistics set afterwards
    image, _, _, valid = ds.cut(0, Window(64, 64, 64, 64))
    want = (data[[1, 0], 64:128, 64:128] - np.reshape(mean, (2, 1, 1))) / np.reshape(std, (2, 1, 1))
    np.testing.assert_allclose(image[:, valid], want[:, valid], rtol=1e-5, atol=1e-5)


def test_training_items(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "r.tif", np.random.default_rng(0).integers(1, 255, (1, 256, 256), np.uint8))
    path = write_layer(tmp_path / "l.gpkg", [px_box(30, 30, 60, 60), px_box(180, 190, 200, 230)], ["a", "b"])
    ds = LocalChips([raster], path, "cls", spec(64), bands=[1, 1, 1], chips_per_epoch=12, seed=5)
    assert len(ds) == 12 and ds.class_names == ["a", "b"]
    with_objects = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype.is_floating_point
        k = len(target["labels"])
        assert target["masks"].shape == (k, 64, 64) and target["boxes"].shape == (k, 4)
        with_objects += k > 0
    assert with_objects >= 4


def test_several_rasters_and_workers(tmp_path: Path) -> None:
    a = write_raster(tmp_path / "a.tif")
    east = Affine(1.0, 0.0, 500_300.0, 0.0, -1.0, 5_000_000.0)  # starts 44 m east of raster a
    b = write_raster(tmp_path / "b.tif", transform=east)
    c = write_raster(tmp_path / "c.tif", transform=Affine(1.0, 0.0, 900_000.0, 0.0, -1.0, 5_000_000.0))
    path = write_layer(tmp_path / "l.gpkg", [px_box(20, 20, 40, 40), px_box(320, 100, 340, 130)], ["a", "a"])
    ds = LocalChips([a, b, c], path, "cls", spec(64), chips_per_epoch=8, augment=NO_AUG)
    assert [len(ls) for ls in ds.labelsets] == [1, 1, 0] and ds.regions[2].is_empty
    assert {r for r, _ in ds.windows()} == {0, 1}
    sample = {ds.sample_window(np.random.default_rng(i), 64)[0] for i in range(30)}
    assert sample == {0, 1}
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list)
    sums = [float(image.sum()) for batch in loader for image, _ in batch]
    # Batches alternate between the 2 workers; had they the same random stream, batch 1 would repeat batch 0.
    assert len(sums) == 8 and sums[0:2] != sums[2:4] and sums[4:6] != sums[6:8]


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SPACENET / "sample_geotiff.tif").is_file(),
                    reason="../shared/data/spacenet_samples (SpaceNet sample GeoTIFF) not present")
def test_spacenet_sample() -> None:
    sp = ChipSpec(256, [0], [0.0], [1.0])
    ds = LocalChips([SPACENET / "sample_geotiff.tif"], SPACENET / "geotiff_labels.geojson", "building", sp,
                    split="all", train=False)
    assert ds.class_names == ["yes"] and len(ds.labelsets[0]) == 43 and ds.num_instances == 43
    sp.mean, sp.std = ds.band_statistics()
    assert 0 < sp.mean[0] < 65535 and sp.std[0] > 0
    targets = [ds[i][1] for i in range(len(ds))]
    assert len(targets) == 16 and sum(len(t["labels"]) for t in targets) >= 43
    assert all(int(m.sum()) >= 4 for t in targets for m in t["masks"])


def test_training_windows_stay_in_the_annotated_region(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "r.tif", np.random.default_rng(0).integers(1, 255, (1, 256, 256), np.uint8))
    path = write_layer(tmp_path / "l.gpkg", [px_box(10, 10, 30, 30), px_box(150, 150, 170, 170)], ["a", "a"])
    aoi = write_layer(tmp_path / "aoi.gpkg", [px_box(0, 0, 200, 256)], ["x"])
    ds = LocalChips([raster], path, "cls", spec(64), aoi=aoi, bands=[1, 1, 1], chips_per_epoch=8)
    rng = np.random.default_rng(3)
    for _ in range(200):
        _, w = ds.sample_window(rng, 64)
        assert 0 <= w.col_off and w.col_off + 64 <= 200 and 0 <= w.row_off and w.row_off + 64 <= 256
