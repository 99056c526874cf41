"""Concurrent streams of batches in one process (rs_engine/predict.py): the same features as one stream, in plan
order, predicted on several threads; the automatic plan of streams and threads; the real model on the real
example gives the same objects with 2 streams as with 1."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import shapely
from test_merge import Scene

from rs_engine.errors import InputError
from rs_engine.pipeline import Cancelled, SegmentOptions, segment
from rs_engine.predict import MAX_AUTO_STREAMS, stream_plan

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nwpu_021.jpg"


def _features(path: Path, read_gpkg) -> list[tuple]:
    _, rows = read_gpkg(path)
    out = [(int(r["class_id"]), round(float(r["score"]), 6), shapely.normalize(r["geometry"])) for r in rows]
    return sorted(out, key=lambda f: (f[0], f[2].bounds))


def test_stream_plan(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert stream_plan(None, None) == (2, 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert stream_plan(8, None) == (MAX_AUTO_STREAMS, 8 // MAX_AUTO_STREAMS)
    assert stream_plan(3, 1) == (1, 3)
    assert stream_plan(2, None, device="cuda:0") == (1, 2)
    assert stream_plan(1, 4) == (4, 1)
    for bad in ((0, None), (2, 0)):
        with pytest.raises(InputError, match="at least 1"):
            stream_plan(*bad)


class SlowThreadRecorder:
    """Wraps a predictor: sleeps a little per call (so calls overlap) and records the calling threads."""

    def __init__(self, inner) -> None:
        self.inner, self.threads, self.lock = inner, set(), threading.Lock()

    def __call__(self, images):
        with self.lock:
            self.threads.add(threading.get_ident())
        time.sleep(0.02)
        return self.inner(images)


@pytest.mark.parametrize("streams", [2, 3])
def test_streams_give_the_features_of_one_stream(streams, write_raster, make_card, label_predictor, read_gpkg,
                                                 tmp_path) -> None:  # fmt: skip
    scene = Scene(64, 16)
    raster = write_raster(scene.data)
    card = make_card(tile_size=64, overlap=16)
    one = segment([raster], tmp_path / "one.gpkg", SegmentOptions(batch_size=2), predictor=label_predictor(),
                  card=card)  # fmt: skip
    recorder = SlowThreadRecorder(label_predictor())
    seen = []
    many = segment([raster], tmp_path / "many.gpkg", SegmentOptions(batch_size=2, streams=streams),
                   predictor=recorder, card=card, progress=lambda d, t: seen.append(d))  # fmt: skip
    assert many.features == one.features == len(scene.objects)
    assert _features(tmp_path / "many.gpkg", read_gpkg) == _features(tmp_path / "one.gpkg", read_gpkg)
    assert len(recorder.threads) > 1 and threading.get_ident() not in recorder.threads
    assert seen == sorted(seen) and seen[-1] == one.tiles


def test_cancel_stops_streams_and_writes_nothing(write_raster, make_card, label_predictor, tmp_path) -> None:
    raster = write_raster(Scene(64, 16).data)
    cancel = threading.Event()
    out = tmp_path / "c.gpkg"
    with pytest.raises(Cancelled):
        segment([raster], out, SegmentOptions(batch_size=1, streams=2), predictor=label_predictor(),
                card=make_card(tile_size=64, overlap=16), cancel=cancel,
                progress=lambda d, t: cancel.set() if d >= 2 else None)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".c.gpkg*"))


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_real_model_two_streams_same_objects(runtime, read_gpkg, tmp_path) -> None:
    """Two streams of one thread against one stream of one thread: the same objects (classes, outlines)."""
    runs = {}
    for name, threads, streams in (("one", 1, 1), ("two", 2, 2)):
        opts = SegmentOptions(model="nwpu10", runtime=runtime, threads=threads, streams=streams, batch_size=1)
        runs[name] = segment([EXAMPLE], tmp_path / f"{name}.gpkg", opts)
        if runtime == "torch":
            import torch

            assert torch.get_num_threads() == 1  # threads // streams
    assert runs["one"].features == runs["two"].features > 10
    pairs = zip(_features(tmp_path / "two.gpkg", read_gpkg), _features(tmp_path / "one.gpkg", read_gpkg),
                strict=True)  # fmt: skip
    for (ca, _, ga), (cb, _, gb) in pairs:
        assert ca == cb and ga.intersection(gb).area / ga.union(gb).area > 0.99
