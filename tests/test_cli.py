"""`rs-engine` as a user runs it: a subprocess, real rasters, a real (small, untrained) model file.

Bad input, each case: exit code 2, one clear line naming the problem, no traceback, nothing at the output path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from rs_engine.checkpoint import ModelCard, save_model
from rs_engine.models import ModelConfig, build_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ENGINE = [sys.executable, "-m", "rs_engine.cli"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ENGINE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A real model file: ssm_tiny, 3 bands, 2 classes, 128 px tiles, untrained (weights seeded)."""
    import torch

    torch.manual_seed(0)
    config = ModelConfig(backbone="ssm_tiny", in_channels=3, num_classes=2, tile_size=128, box_score_thresh=0.0)
    card = ModelCard(
        name="cli-test", version="0", architecture=config.to_dict(), class_names=["a", "b"], bands=3,
        mean=[100.0] * 3, std=[50.0] * 3, gsd=None, tile_size=128, overlap=32, score_threshold=0.0,
    )
    return save_model(tmp_path_factory.mktemp("model") / "m.safetensors", build_model(config), card)


def write_raster(path: Path, bands: int = 3, size: int = 200, nodata: float | None = None,
                 fill: float | None = None) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (bands, size, size)).astype(np.uint8)
    if fill is not None:
        data[:] = fill
    with rasterio.open(
        path, "w", driver="GTiff", width=size, height=size, count=bands, dtype="uint8",
        crs="EPSG:32616", transform=from_origin(500000, 3700000, 0.5, 0.5), nodata=nodata,
        tiled=True, blockxsize=64, blockysize=64,
    ) as ds:
        ds.write(data)
    return path


@pytest.fixture()
def raster(tmp_path) -> Path:
    return write_raster(tmp_path / "scene.tif")


def test_segment_writes_layer(raster, model_file, tmp_path) -> None:
    import pyogrio

    out = tmp_path / "out.gpkg"
    r = run("segment", raster, "-o", out, "--model", model_file, "--progress", "none")
    assert r.returncode == 0, r.stderr
    info = pyogrio.read_info(out, layer="instances")
    assert list(info["fields"]) == ["class_id", "class_name", "score", "area", "source", "model", "run_id"]
    assert "32616" in info["crs"]
    assert info["geometry_type"] in ("MultiPolygon", "Polygon")


def test_segment_jsonl_progress(raster, model_file, tmp_path) -> None:
    out = tmp_path / "out.gpkg"
    r = run("segment", raster, "-o", out, "--model", model_file, "--progress", "jsonl")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert events[-1]["event"] == "done" and events[-1]["output"] == str(out)
    assert isinstance(events[-1]["features"], int)


def _bad(args: list, out: Path, expect: str) -> str:
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert expect.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}*")], "temporary file left behind"
    return lines[0]


def test_missing_file(model_file, tmp_path) -> None:
    out = tmp_path / "o.gpkg"
    _bad(["segment", tmp_path / "nope.tif", "-o", out, "--model", model_file], out, "nope.tif")


def test_not_a_raster(model_file, tmp_path) -> None:
    txt = tmp_path / "notes.tif"
    txt.write_text("this is not a raster\n")
    out = tmp_path / "o.gpkg"
    _bad(["segment", txt, "-o", out, "--model", model_file], out, "notes.tif")


def test_truncated_geotiff(model_file, tmp_path) -> None:
    src = write_raster(tmp_path / "full.tif", size=400)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "o.gpkg"
    _bad(["segment", cut, "-o", out, "--model", model_file], out, "cut.tif")


def test_all_nodata(model_file, tmp_path) -> None:
    r = write_raster(tmp_path / "empty.tif", nodata=0, fill=0)
    out = tmp_path / "o.gpkg"
    _bad(["segment", r, "-o", out, "--model", model_file], out, "nodata")


def test_wrong_band_count(model_file, tmp_path) -> None:
    r = write_raster(tmp_path / "two.tif", bands=2)
    out = tmp_path / "o.gpkg"
    _bad(["segment", r, "-o", out, "--model", model_file], out, "has 2 band(s)")


def test_single_band_raster_repeated_with_a_notice(model_file, tmp_path) -> None:
    """Issue 18: a panchromatic (1-band) raster and a 3-band model run as ``--bands 1,1,1``, with one notice."""
    r = write_raster(tmp_path / "pan.tif", bands=1)
    out = tmp_path / "o.gpkg"
    res = run("segment", r, "-o", out, "--model", model_file, "--progress", "none")
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if "repeating band 1" in line]
    assert len(notes) == 1 and notes[0].endswith("pan.tif: has 1 band, model cli-test 0 takes 3: repeating band 1 "
                                                 "(as --bands 1,1,1)"), res.stderr
    assert out.exists()


def test_unknown_model(raster, tmp_path) -> None:
    out = tmp_path / "o.gpkg"
    _bad(["segment", raster, "-o", out, "--model", "no-such-model"], out, "no-such-model")


def test_corrupt_model(raster, tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(os.urandom(1000))
    out = tmp_path / "o.gpkg"
    _bad(["segment", raster, "-o", out, "--model", bad], out, "broken.safetensors")


def test_unwritable_output_dir(raster, model_file, tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "o.gpkg"  # a directory that is a file: can't be created or written, even as root
    r = run("segment", raster, "-o", out, "--model", model_file)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "o.gpkg" in r.stderr or "afile" in r.stderr
    out2 = tmp_path / "missing_dir" / "o.gpkg"
    _bad(["segment", raster, "-o", out2, "--model", model_file], out2, "missing_dir")


def test_existing_output_kept_without_overwrite(raster, model_file, tmp_path) -> None:
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"precious")
    r = run("segment", raster, "-o", out, "--model", model_file)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == b"precious"


def test_extent_outside(raster, model_file, tmp_path) -> None:
    out = tmp_path / "o.gpkg"
    _bad(["segment", raster, "-o", out, "--model", model_file, "--extent", "0,0,10,10"], out, "extent")


def test_usage_error_is_one_line(raster, tmp_path) -> None:
    out = tmp_path / "o.gpkg"
    _bad(["segment", raster, "-o", out, "--extent", "1,2,3"], out, "extent")


def test_extent_checked_once_same_message_as_the_api(raster, model_file, tmp_path) -> None:
    from rs_engine.pipeline import SegmentOptions, segment
    from rs_engine.raster import ExtentError

    out = tmp_path / "o.gpkg"
    line = _bad(["segment", raster, "-o", out, "--model", model_file, "--extent", "10,0,0,10"], out, "extent")
    with pytest.raises(ExtentError) as err:
        segment([raster], out, SegmentOptions(model=str(model_file), extent=(10, 0, 0, 10)))
    assert line == f"rs-engine: error: {err.value}"
    assert str(err.value) == "--extent 10,0,0,10: needs MINX < MAXX and MINY < MAXY"


def test_cancel_by_sigterm_leaves_nothing(model_file, tmp_path) -> None:
    big = write_raster(tmp_path / "big.tif", size=1200)
    out = tmp_path / "o.gpkg"
    proc = subprocess.Popen(
        [*ENGINE, "segment", str(big), "-o", str(out), "--model", str(model_file), "--progress", "jsonl",
         "--batch-size", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress" and json.loads(line)["done"] >= 1:
            proc.send_signal(signal.SIGTERM)
            break
    rest = [json.loads(line) for line in proc.stdout]
    proc.wait(timeout=120)
    assert proc.returncode == 130, proc.stderr.read()
    assert rest[-1] == {"event": "cancelled"}  # as rs-train reports it (issue 18: it was an error event)
    assert "error" not in {e["event"] for e in rest}
    assert not out.exists()
    assert not list(tmp_path.glob(".o.gpkg*"))


def test_models_and_doctor(model_file) -> None:
    r = run("models", "--json", model_file)
    assert r.returncode == 0, r.stderr
    cards = json.loads(r.stdout)
    assert cards[-1]["card"]["class_names"] == ["a", "b"]
    r = run("doctor", "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["torch"] and "mamba_ssm" in facts and facts["device_auto"] in ("cpu", "cuda")


@pytest.mark.skipif(not (SHARED / "spacenet_samples").is_dir(), reason="../shared/data not present")
def test_real_awkward_rasters(model_file, tmp_path) -> None:
    """Real SpaceNet 6 inputs: complex64 SAR (magnitude) and 4-band float64, through band selection."""
    for name, bands in [("sar_hh.tif", "1,1,1"), ("ms1.tif", "1,2,3"), ("rgb_unmasked.tif", None)]:
        out = tmp_path / f"{name}.gpkg"
        args = ["segment", SHARED / "spacenet_samples" / name, "-o", out, "--model", model_file,
                "--progress", "none"]
        if bands:
            args += ["--bands", bands]
        r = run(*args)
        assert r.returncode == 0, (name, r.stderr)
        assert out.exists()
