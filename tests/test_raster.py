"""Reading rasters: tile plans, dtypes, band selection, nodata, bounded reads. Bad input and clean-up at the
:func:`segment` level: every user error is an InputError naming the file, and nothing is left at OUT."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.io
import shapely
import torch
from affine import Affine
from shapely import affinity
from shapely.geometry import MultiPolygon, box
from shapely.ops import unary_union

from rs_engine.errors import InputError
from rs_engine.pipeline import FIELDS, Cancelled, SegmentOptions, segment
from rs_engine.raster import NODATA_CHECK_SIZE
from rs_engine.tiling import plan_tiles

BACKGROUND, CLASS1, CLASS2 = 10, 100, 200
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "spacenet_samples"


def to_map(geometry, transform: Affine = TRANSFORM):
    t = transform
    return affinity.affine_transform(geometry, [t.a, t.b, t.d, t.e, t.c, t.f])


def two_objects(h: int = 120, w: int = 150) -> np.ndarray:
    data = np.full((h, w), BACKGROUND, np.uint8)
    data[30:50, 40:100] = CLASS1  # crosses tile edges of a 64/16 plan
    data[70:110, 10:30] = CLASS2
    return data


TRUTH = [(box(40, 30, 100, 50), 1), (box(10, 70, 30, 110), 2)]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith("-journal")]


# ------------------------------------------------------------------------------------------------ tile plan


@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap"),
    [
        (300, 260, 64, 16),
        (64, 64, 64, 16),
        (65, 200, 64, 0),
        (30, 20, 64, 16),
        (1000, 1, 64, 8),
        (129, 130, 64, 63),
    ],
)
def test_tile_plan_covers_raster_exactly(width, height, tile, overlap):
    plan = plan_tiles(width, height, tile, overlap)
    cover = np.zeros((height, width), int)
    for t in plan.tiles:
        x0, y0, x1, y1 = t.core
        cover[y0:y1, x0:x1] += 1
        assert t.x0 <= x0 < x1 <= t.x0 + tile and t.y0 <= y0 < y1 <= t.y0 + tile  # core inside its tile
        assert t.interior == (t.col > 0, t.row > 0, t.col < plan.n_cols - 1, t.row < plan.n_rows - 1)
    assert (cover == 1).all()  # cores partition the raster
    for offsets, length in ((plan.col_offsets, width), (plan.row_offsets, height)):
        assert offsets[0] == 0
        if length >= tile:  # inside the raster, the last one flush with its edge
            assert all(0 <= o and o + tile <= length for o in offsets) and offsets[-1] + tile == length
        else:
            assert offsets == (0,)  # one padded tile
        assert all(0 < b - a <= tile - overlap for a, b in zip(offsets, offsets[1:], strict=False))
    assert [t.index for t in plan.tiles] == list(range(len(plan)))


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize(
    "dtype", ["uint8", "uint16", "int16", "float32", "float64", "complex64", "uint16x100"]
)
def test_dtypes_give_the_same_objects(dtype, write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    data = two_objects()
    card = make_card()
    if dtype == "complex64":
        phase = np.random.default_rng(0).uniform(-np.pi, np.pi, data.shape)
        data = (data * np.exp(1j * phase)).astype(np.complex64)  # magnitude = the scene
    elif dtype == "uint16x100":
        data = data.astype(np.uint16) * 100
        card = make_card(std=100.0)  # normalisation brings it back to the predictor's values
    elif dtype == "int16":
        data = data.astype(np.int16)
        data[data == BACKGROUND] = -500
    else:
        data = data.astype(dtype)
    out = tmp_path / "out.gpkg"
    segment([write_raster(data)], out, predictor=label_predictor(), card=card)
    _, rows = read_gpkg(out)
    found = sorted((shapely.normalize(r["geometry"]).wkt, r["class_id"]) for r in rows)
    assert found == sorted((shapely.normalize(MultiPolygon([to_map(g)])).wkt, c) for g, c in TRUTH)


def test_band_selection(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    data = np.full((3, 120, 150), BACKGROUND, np.uint8)
    data[2] = two_objects()
    path = write_raster(data)
    out = tmp_path / "out.gpkg"
    segment([path], out, SegmentOptions(bands=[3]), predictor=label_predictor(), card=make_card())
    assert len(read_gpkg(out)[1]) == 2
    segment([path], out, SegmentOptions(overwrite=True), predictor=label_predictor(), card=make_card())
    assert len(read_gpkg(out)[1]) == 0  # default: the first band, which is empty
    # A single-band raster fed to a 3-band model by repeating its band.
    single = write_raster(two_objects(), name="single.tif")
    segment(
        [single],
        out,
        SegmentOptions(bands=[1, 1, 1], overwrite=True),
        predictor=label_predictor(),
        card=make_card(bands=3),
    )
    assert len(read_gpkg(out)[1]) == 2


def test_single_band_raster_is_repeated_for_a_multiband_model(write_raster, make_card, label_predictor, read_gpkg,
                                                             tmp_path, caplog):
    """Issue 18: a 1-band raster (panchromatic, SAR) and a 3-band model, no --bands: band 1 is repeated, as
    ``--bands 1,1,1`` does, with a one-line warning; before, the run stopped with "needs 3"."""
    seen: list[np.ndarray] = []
    inner = label_predictor()

    def predictor(images: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        seen.extend(images)
        return inner(images)

    out = tmp_path / "out.gpkg"
    with caplog.at_level("WARNING", logger="rs_engine.raster"):
        segment([write_raster(two_objects(), name="pan.tif")], out, predictor=predictor, card=make_card(bands=3))
    assert len(read_gpkg(out)[1]) == 2
    assert seen and all(img.shape[0] == 3 and np.array_equal(img[0], img[1]) and np.array_equal(img[0], img[2])
                        for img in seen)
    notes = [r.getMessage() for r in caplog.records if "repeating band 1" in r.getMessage()]
    assert notes == ["pan.tif: has 1 band, model test 0 takes 3: repeating band 1 (as --bands 1,1,1)"]


def test_file_notices_are_logged_once_per_file(write_raster, tmp_path, caplog):
    """Training datasets open a source per chip: the 1-band notice comes once per file, not once per chip."""
    from rs_engine.raster import RasterSource

    a, b = write_raster(two_objects(), name="a.tif"), write_raster(two_objects(), name="b.tif")
    with caplog.at_level("WARNING", logger="rs_engine.raster"):
        for path in (a, a, a, b, b):
            RasterSource(path, 3, resample=False).close()
    notes = [r.getMessage() for r in caplog.records if "repeating band 1" in r.getMessage()]
    note = "{}: has 1 band, the model takes 3: repeating band 1 (as --bands 1,1,1)"
    assert notes == [note.format("a.tif"), note.format("b.tif")]


def _masked_raster(kind: str, write_raster) -> Path:
    """60 x 60 raster (smaller than a tile) whose columns 30-45 are nodata, expressed three ways."""
    data = np.full((60, 60), 50, np.uint8)
    if kind == "nodata value":
        data[:, 30:45] = 0
        return write_raster(data, nodata=0)
    if kind == "NaN":
        data = data.astype(np.float32)
        data[:, 30:45] = np.nan
        return write_raster(data)
    path = write_raster(data)
    mask = np.full((60, 60), 255, np.uint8)
    mask[:, 30:45] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        dst.write_mask(mask)
    return path


@pytest.mark.parametrize("kind", ["nodata value", "NaN", "mask band"])
def test_masks_are_cleared_on_nodata_and_padding(
    kind, write_raster, make_card, fixed_predictor, read_gpkg, tmp_path
):
    path = _masked_raster(kind, write_raster)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 10:64] = True  # reaches into nodata (30-45) and padding (60-64)
    out = tmp_path / "out.gpkg"
    segment([path], out, predictor=fixed_predictor(mask), card=make_card())
    _, rows = read_gpkg(out)
    assert len(rows) == 1
    assert rows[0]["geometry"].equals(to_map(unary_union([box(10, 10, 30, 50), box(45, 10, 60, 50)])))


def test_all_nodata_tiles_are_skipped(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    data = np.full((64, 200), BACKGROUND, np.uint8)
    data[20:40, 20:40] = CLASS1
    data[:, 128:] = 0  # the tiles at x 128 and 136 see only nodata
    predictor = label_predictor()
    out = tmp_path / "out.gpkg"
    result = segment(
        [write_raster(data, nodata=0)], out, SegmentOptions(overlap=0), predictor=predictor, card=make_card()
    )
    assert (result.tiles, result.skipped_tiles, predictor.tiles) == (4, 2, 2)
    assert len(read_gpkg(out)[1]) == 1


def test_reads_are_windowed_never_whole_raster(
    monkeypatch, write_raster, make_card, label_predictor, tmp_path
):
    size = 600  # bigger than the decimated nodata check, so that check must decimate
    data = np.full((size, size), BACKGROUND, np.uint8)
    data[100:140, 50:300] = CLASS1
    path = write_raster(data)
    calls: list[tuple[str, object, object]] = []
    for name in ("read", "read_masks"):
        original = getattr(rasterio.io.DatasetReader, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("window"), kwargs.get("out_shape")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(rasterio.io.DatasetReader, name, spy)
    segment([path], tmp_path / "out.gpkg", predictor=label_predictor(), card=make_card())
    assert calls
    for name, window, out_shape in calls:
        assert window is not None, f"{name} without a window reads the whole raster"
        small = window.width <= 64 and window.height <= 64
        decimated = out_shape is not None and max(out_shape[-2:]) <= NODATA_CHECK_SIZE
        assert small or decimated, (name, window, out_shape)


# ----------------------------------------------------------------------------------------------- output


def test_output_schema_and_attributes(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    out = tmp_path / "out.gpkg"
    result = segment(
        [write_raster(two_objects(), name="area 51.tif")],
        out,
        SegmentOptions(run_id="run-1"),
        predictor=label_predictor(),
        card=make_card(),
    )
    info, rows = read_gpkg(out)
    assert (
        list(info["fields"])
        == FIELDS
        == ["class_id", "class_name", "score", "area", "source", "model", "run_id"]
    )
    assert info["ogr_types"] == [
        "OFTInteger",
        "OFTString",
        "OFTReal",
        "OFTReal",
        "OFTString",
        "OFTString",
        "OFTString",
    ]
    assert info["geometry_type"] == "MultiPolygon" and info["crs"] == "EPSG:32616"
    assert result.features == len(rows) == 2 and result.run_id == "run-1"
    for row in rows:
        assert row["class_name"] == {1: "building", 2: "tank"}[row["class_id"]]
        assert (row["source"], row["model"], row["run_id"]) == ("area 51.tif", "test 0", "run-1")
        assert 0 <= row["score"] <= 1 and row["area"] == pytest.approx(row["geometry"].area)
    assert leftovers(tmp_path) == []


def test_run_without_objects_writes_an_empty_layer(
    write_raster, make_card, label_predictor, read_gpkg, tmp_path
):
    out = tmp_path / "out.gpkg"
    result = segment(
        [write_raster(np.full((80, 80), BACKGROUND, np.uint8))],
        out,
        predictor=label_predictor(),
        card=make_card(),
    )
    info, rows = read_gpkg(out)
    assert result.features == 0 and rows == []
    assert (
        list(info["fields"]) == FIELDS
        and info["crs"] == "EPSG:32616"
        and info["geometry_type"] == "MultiPolygon"
    )


def test_progress_counts_tiles(write_raster, make_card, label_predictor, tmp_path):
    seen: list[tuple[int, int]] = []
    result = segment(
        [write_raster(two_objects())],
        tmp_path / "out.gpkg",
        SegmentOptions(batch_size=2),
        predictor=label_predictor(),
        card=make_card(),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[0] == (0, result.tiles) and seen[-1] == (result.tiles, result.tiles)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_overwrite_replaces_existing_output(write_raster, make_card, label_predictor, read_gpkg, tmp_path):
    out = tmp_path / "out.gpkg"
    out.write_text("old")
    segment(
        [write_raster(two_objects())],
        out,
        SegmentOptions(overwrite=True),
        predictor=label_predictor(),
        card=make_card(),
    )
    assert len(read_gpkg(out)[1]) == 2


# ------------------------------------------------------------------------------------------- bad input


def _truncated(tmp_path: Path, write_raster) -> Path:
    data = np.full((3, 512, 512), BACKGROUND, np.uint8)
    path = write_raster(data, name="truncated.tif")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def _case(name: str, tmp_path: Path, write_raster, make_card):
    """(inputs, output, options, card, text the message must contain) for one kind of bad input."""
    good = write_raster(two_objects(), name="good.tif")
    out = tmp_path / "out.gpkg"
    card = make_card()
    options = SegmentOptions()
    if name == "missing file":
        return [tmp_path / "nope.tif"], out, options, card, "nope.tif: file not found"
    if name == "not a raster":
        text = tmp_path / "notes.txt"
        text.write_text("not pixels\n")
        return [text], out, options, card, "notes.txt: not a raster GDAL can read"
    if name == "truncated GeoTIFF":
        return [_truncated(tmp_path, write_raster)], out, options, make_card(bands=3), "truncated.tif"
    if name == "all nodata":
        path = write_raster(np.zeros((80, 80), np.uint8), name="empty.tif", nodata=0)
        return [path], out, options, card, "empty.tif: raster is entirely nodata"
    if name == "too few bands":
        two = write_raster(np.stack([two_objects()] * 2), name="two.tif")
        return [two], out, options, make_card(bands=3), "two.tif: has 2 band(s) but model test 0 needs 3"
    if name == "band out of range":
        return [good], out, SegmentOptions(bands=[4]), card, "--bands 4"
    if name == "output folder is a file":
        (tmp_path / "file").write_text("x")
        return [good], tmp_path / "file" / "out.gpkg", options, card, "is not a folder"
    if name == "output folder missing":
        return [good], tmp_path / "nodir" / "out.gpkg", options, card, "does not exist"
    if name == "output exists":
        out.write_text("keep me")
        return [good], out, options, card, "out.gpkg: already exists"
    if name == "not a gpkg":
        return [good], tmp_path / "out.shp", options, card, "out.shp: output must be a GeoPackage"
    if name == "extent outside":
        return [good], out, SegmentOptions(extent=(0, 0, 10, 10)), card, "lies outside"
    if name == "overlap too large":
        return [good], out, SegmentOptions(overlap=64), card, "--overlap 64"
    raise AssertionError(name)


BAD_INPUTS = [
    "missing file",
    "not a raster",
    "truncated GeoTIFF",
    "all nodata",
    "too few bands",
    "band out of range",
    "output folder is a file",
    "output folder missing",
    "output exists",
    "not a gpkg",
    "extent outside",
    "overlap too large",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_an_input_error_and_leaves_nothing(
    name, write_raster, make_card, label_predictor, tmp_path
):
    inputs, out, options, card, message = _case(name, tmp_path, write_raster, make_card)
    existed = out.exists()
    with pytest.raises(InputError) as error:
        segment(inputs, out, options, predictor=label_predictor(), card=card)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    if existed:
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_corrupt_pixels_found_mid_run_leave_nothing(write_raster, make_card, label_predictor, tmp_path):
    """Validation reads no pixels of an all-valid raster, so the truncation shows up while tiling."""
    path = _truncated(tmp_path, write_raster)
    out = tmp_path / "out.gpkg"
    with pytest.raises(InputError, match="truncated.tif: raster data is corrupt or truncated"):
        segment([path], out, predictor=label_predictor(), card=make_card(bands=3))
    assert not out.exists() and leftovers(tmp_path) == []


def test_cancel_before_and_during_the_run(write_raster, make_card, label_predictor, tmp_path):
    path = write_raster(two_objects())
    out = tmp_path / "out.gpkg"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        segment([path], out, predictor=label_predictor(), card=make_card(), cancel=cancel)
    assert not out.exists() and leftovers(tmp_path) == []

    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done > 0:
            cancel.set()  # as a GUI would, from another thread, between batches

    with pytest.raises(Cancelled):
        segment(
            [path],
            out,
            SegmentOptions(batch_size=1),
            predictor=label_predictor(),
            card=make_card(),
            progress=progress,
            cancel=cancel,
        )
    assert not out.exists() and leftovers(tmp_path) == []


def test_interrupt_keeps_previous_output(write_raster, make_card, label_predictor, tmp_path):
    out = tmp_path / "out.gpkg"
    out.write_text("previous run")
    inner = label_predictor()

    def predictor(images: list[np.ndarray]):
        if inner.calls == 2:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM turned into one by the CLI
        return inner(images)

    with pytest.raises(KeyboardInterrupt):
        segment(
            [write_raster(two_objects())],
            out,
            SegmentOptions(overwrite=True, batch_size=1),
            predictor=predictor,
            card=make_card(),
        )
    assert out.read_text() == "previous run"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared SpaceNet samples not present (../shared/data)")
@pytest.mark.parametrize(
    ("name", "bands"),
    [
        ("sample_geotiff.tif", [1, 1, 1]),  # uint16, nodata 0
        ("sar_hh.tif", [1, 1, 1]),  # complex64, rotated
        ("ms1.tif", [1, 2, 3]),  # 4-band float64
    ],
)
def test_real_rasters(name, bands, make_card, fixed_predictor, read_gpkg, tmp_path):
    mask = np.zeros((256, 256), bool)
    mask[100:140, 100:140] = True  # one square per tile
    out = tmp_path / "out.gpkg"
    with rasterio.open(SHARED / name) as src:
        crs = src.crs
        footprint = box(*rasterio.transform.array_bounds(src.height, src.width, src.transform))
    result = segment(
        [SHARED / name],
        out,
        SegmentOptions(bands=bands),
        predictor=fixed_predictor(mask),
        card=make_card(bands=3, tile_size=256, overlap=32, gsd=None),
    )
    info, rows = read_gpkg(out)
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == crs and result.features == len(rows) > 0
    for row in rows:
        assert row["geometry"].is_valid and row["geometry"].intersects(footprint)
    assert os.listdir(tmp_path) == ["out.gpkg"]
