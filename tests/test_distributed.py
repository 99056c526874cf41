"""Scale-out on a real Dask cluster (a ``LocalCluster`` of 2 worker processes): the same features as a run in
one process, for several block sizes, on scenes whose objects straddle tile (hence block) edges; a worker killed
mid-run; cancel; bad input among many scenes; many inputs (folders, globs, a VRT mosaic, scenes in other CRSs).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from test_merge import Scene

import rs_engine.distributed as rs_cluster
from rs_engine.errors import InputError
from rs_engine.pipeline import Cancelled, SegmentOptions, segment

distributed = pytest.importorskip("distributed", reason="the cluster extra (dask[distributed]) is not installed")

ENGINE = [sys.executable, "-m", "rs_engine.cli"]
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, as ``local:2`` starts; tests reach it as tcp://."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as c:  # fmt: skip
        yield c


@pytest.fixture()
def predictor_cls(label_predictor):
    # The stand-in predictor lives in conftest, which worker processes can't import: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[label_predictor.__module__])
    return label_predictor


class KillOnce:
    """Wraps a predictor; the first call anywhere (a marker file decides) kills its own worker process."""

    def __init__(self, inner, marker: Path):
        self.inner, self.marker = inner, marker

    def __call__(self, images):
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(images)


def features(path: Path, read_gpkg) -> list[tuple]:
    """(class_id, score, normalised geometry) per feature, in a stable order."""
    _, rows = read_gpkg(path)
    out = [(int(r["class_id"]), float(r["score"]), shapely.normalize(r["geometry"])) for r in rows]
    return sorted(out, key=lambda f: (f[0], f[2].bounds))


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for (ca, sa, ga), (cb, sb, gb) in zip(a, b, strict=True):
        assert ca == cb and sa == pytest.approx(sb)
        assert ga.equals_exact(gb, 1e-6), (ga.wkt[:80], gb.wkt[:80])


@pytest.fixture()
def scene_raster(write_raster):
    scene = Scene(64, 16)
    return scene, write_raster(scene.data)


@pytest.mark.parametrize("block_tiles", [1, 3, 7, 1000])
def test_cluster_equals_one_process(block_tiles, cluster, scene_raster, make_card, predictor_cls, read_gpkg,
                                    tmp_path):  # fmt: skip
    scene, raster = scene_raster
    card = make_card(tile_size=64, overlap=16)
    one = segment([raster], tmp_path / "one.gpkg", SegmentOptions(), predictor=predictor_cls(), card=card)
    options = SegmentOptions(scheduler=cluster.scheduler_address, block_tiles=block_tiles, batch_size=2)
    seen = []
    many = segment([raster], tmp_path / "many.gpkg", options, predictor=predictor_cls(), card=card,
                   progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert many.features == one.features == len(scene.objects)
    n = one.tiles
    assert many.run_id != one.run_id and many.tiles == n == 25
    assert_same(features(tmp_path / "many.gpkg", read_gpkg), features(tmp_path / "one.gpkg", read_gpkg))
    # Progress in tiles across workers, block by block, ending at the total.
    assert [d for d, _ in seen] == [0, *range(block_tiles, n, block_tiles), n] and {t for _, t in seen} == {n}


def test_killed_worker_loses_and_duplicates_nothing(cluster, scene_raster, make_card, predictor_cls, read_gpkg,
                                                     tmp_path):  # fmt: skip
    _, raster = scene_raster
    card = make_card(tile_size=64, overlap=16)
    segment([raster], tmp_path / "one.gpkg", SegmentOptions(), predictor=predictor_cls(), card=card)
    marker = tmp_path / "killed"
    options = SegmentOptions(scheduler=cluster.scheduler_address, block_tiles=4)
    segment([raster], tmp_path / "many.gpkg", options, predictor=KillOnce(predictor_cls(), marker), card=card)
    assert marker.exists(), "no worker was killed"
    assert_same(features(tmp_path / "many.gpkg", read_gpkg), features(tmp_path / "one.gpkg", read_gpkg))


def test_cancel_stops_the_cluster_work_and_leaves_nothing(cluster, write_raster, make_card, predictor_cls,
                                                           tmp_path):  # fmt: skip
    raster = write_raster(Scene(64, 16, seed=1).data)
    cancel = threading.Event()
    out = tmp_path / "o.gpkg"

    def progress(done: int, total: int) -> None:
        if done > 0:
            cancel.set()

    options = SegmentOptions(scheduler=cluster.scheduler_address, block_tiles=1)
    with pytest.raises(Cancelled):
        segment([raster], out, options, predictor=predictor_cls(), card=make_card(), progress=progress,
                cancel=cancel)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".o.gpkg*"))
    deadline = time.monotonic() + 10
    while any(str(k).startswith("delineate-") for k in cluster.scheduler.tasks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in cluster.scheduler.tasks if str(k).startswith("delineate-")], "blocks left running"


def test_bad_input_among_many_fails_before_any_work(write_raster, make_card, predictor_cls, tmp_path,
                                                    monkeypatch):  # fmt: skip
    good = [write_raster(Scene(64, 16, seed=s).data, name=f"s{s}.tif") for s in range(2)]
    cut = tmp_path / "cut.tif"
    big = write_raster(np.full((700, 700), 10, np.uint8), name="big.tif")
    cut.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    started = []
    monkeypatch.setattr(rs_cluster, "connect", lambda *a, **k: started.append(a))
    out = tmp_path / "o.gpkg"
    with pytest.raises(InputError, match="cut.tif"):
        segment([good[0], cut, good[1]], out, SegmentOptions(scheduler="local:2"), predictor=predictor_cls(),
                card=make_card())  # fmt: skip
    assert not started and not out.exists()


@pytest.mark.parametrize(("spec", "why"), [("local:0", "at least 1"), ("local", "local:N"),
                                           ("tcp://host", "local:N"), ("dask", "local:N")])  # fmt: skip
def test_bad_scheduler_is_one_line(spec, why):
    with pytest.raises(InputError, match=why):
        rs_cluster.parse_scheduler(spec)


def test_unreachable_scheduler(write_raster, make_card, predictor_cls, tmp_path, monkeypatch):
    monkeypatch.setattr(rs_cluster, "CONNECT_TIMEOUT", 2)
    raster = write_raster(Scene(64, 16).data)
    with pytest.raises(InputError, match="cannot connect"):
        segment([raster], tmp_path / "o.gpkg", SegmentOptions(scheduler="tcp://127.0.0.1:9"),
                predictor=predictor_cls(), card=make_card())  # fmt: skip
    assert not (tmp_path / "o.gpkg").exists()


def test_many_inputs_vrt_mosaic_and_crs(cluster, write_raster, make_card, predictor_cls, read_gpkg, tmp_path):
    """A VRT of four quadrant GeoTIFFs gives the features of the whole raster; a folder and a glob expand to
    their scenes; a scene in another CRS is reprojected to ``crs``."""
    from osgeo import gdal

    scene = Scene(64, 16, seed=2)
    data = scene.data
    whole = write_raster(data, name="whole.tif")
    h2, w2 = data.shape[0] // 2, data.shape[1] // 2
    quads = tmp_path / "quads"
    quads.mkdir()
    for name, (r, c) in {"a": (0, 0), "b": (0, w2), "c": (h2, 0), "d": (h2, w2)}.items():
        part = data[r : r + h2 if r == 0 else None, c : c + w2 if c == 0 else None]
        with rasterio.open(quads / f"{name}.tif", "w", driver="GTiff", width=part.shape[1], height=part.shape[0],
                           count=1, dtype="uint8", crs="EPSG:32616",
                           transform=TRANSFORM * Affine.translation(c, r)) as ds:  # fmt: skip
            ds.write(part, 1)
    vrt = tmp_path / "mosaic.vrt"
    gdal.BuildVRT(str(vrt), [str(p) for p in sorted(quads.glob("*.tif"))]).FlushCache()
    card = make_card(tile_size=64, overlap=16)
    segment([whole], tmp_path / "whole.gpkg", SegmentOptions(), predictor=predictor_cls(), card=card)
    options = SegmentOptions(scheduler=cluster.scheduler_address, block_tiles=5)
    segment([vrt], tmp_path / "vrt.gpkg", options, predictor=predictor_cls(), card=card)
    assert_same(features(tmp_path / "vrt.gpkg", read_gpkg), features(tmp_path / "whole.gpkg", read_gpkg))

    # A folder (four quadrants) and a glob naming two of them again: each scene once, every scene a block of its
    # own, the features reprojected to EPSG:4326, as in one process.
    inputs = [quads, str(quads / "[ab].tif")]
    for name, scheduler in (("one", None), ("many", cluster.scheduler_address)):
        options = SegmentOptions(scheduler=scheduler, crs="EPSG:4326")
        segment(inputs, tmp_path / f"{name}4326.gpkg", options, predictor=predictor_cls(), card=card)
    assert_same(features(tmp_path / "many4326.gpkg", read_gpkg), features(tmp_path / "one4326.gpkg", read_gpkg))
    info, rows = read_gpkg(tmp_path / "many4326.gpkg")
    assert "4326" in info["crs"] and {r["source"] for r in rows} == {"a.tif", "b.tif", "c.tif", "d.tif"}
    lon, lat = rows[0]["geometry"].centroid.coords[0]
    assert -88 < lon < -86 and 36 < lat < 37  # UTM 16N, 500 km E, 4000 km N


def test_folder_glob_and_crs_errors(tmp_path, write_raster, make_card):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no raster files"):
        segment([folder], tmp_path / "o.gpkg", SegmentOptions(), card=make_card())
    with pytest.raises(InputError, match="matches no file"):
        segment([str(folder / "*.tif")], tmp_path / "o.gpkg", SegmentOptions(), card=make_card())
    raster = write_raster(np.full((64, 64), 10, np.uint8))
    with pytest.raises(InputError, match="EPSG:999999: not a CRS"):
        segment([raster], tmp_path / "o.gpkg", SegmentOptions(crs="EPSG:999999"), card=make_card())
    plain = write_raster(np.full((64, 64), 10, np.uint8), name="plain.tif", transform=None, crs=None)
    with pytest.raises(InputError, match="no CRS to reproject from"):
        segment([plain], tmp_path / "o.gpkg", SegmentOptions(crs="EPSG:4326"), card=make_card())
    assert not (tmp_path / "o.gpkg").exists()


def test_cli_local_cluster_real_model_and_sigterm(tmp_path, read_gpkg):
    """``--scheduler local:2`` with the bundled default model on the real NWPU example: the same objects as one
    process, the cluster event first in jsonl; then SIGTERM mid-run: exit 130, nothing written, workers gone."""
    psutil = pytest.importorskip("psutil")
    image = Path(__file__).resolve().parents[1] / "examples" / "nwpu_021.jpg"
    args = [str(image), "--progress", "jsonl", "--batch-size", "1"]
    runs = {}
    for name, extra in (("one", []), ("many", ["--scheduler", "local:2", "--block-tiles", "1"])):
        r = subprocess.run([*ENGINE, "segment", *args, *extra, "-o", str(tmp_path / f"{name}.gpkg")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        runs[name] = [json.loads(line) for line in r.stdout.splitlines()]
    assert runs["many"][0]["event"] == "cluster" and runs["many"][0]["threads"] == 2
    assert runs["many"][-1]["features"] == runs["one"][-1]["features"] > 5
    pairs = zip(features(tmp_path / "many.gpkg", read_gpkg), features(tmp_path / "one.gpkg", read_gpkg), strict=True)
    for (ca, _, ga), (cb, _, gb) in pairs:
        assert ca == cb and ga.intersection(gb).area / ga.union(gb).area > 0.99

    out = tmp_path / "cancelled.gpkg"
    proc = subprocess.Popen([*ENGINE, "segment", *args, "-o", str(out), "--tile-size", "256", "--overlap", "64",
                             "--scheduler", "local:2", "--block-tiles", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    workers = []
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "cluster":
            workers = psutil.Process(proc.pid).children(recursive=True)
        if event["event"] == "progress" and event["done"] >= 1:
            proc.send_signal(signal.SIGTERM)
            break
    proc.wait(timeout=120)
    assert proc.returncode == 130, proc.stderr.read()
    assert not out.exists() and not list(tmp_path.glob(".cancelled.gpkg*"))
    assert workers, "no worker processes seen"
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"worker processes left: {alive}"

