"""OpenVINO as a third runtime (issue 14): the bundled ``.onnx`` file ONNX Runtime runs, on OpenVINO's CPU plugin.

At f32 it must give ONNX Runtime's detections; at its default precision (bf16 on CPUs with AVX512-BF16 or AMX) the
same objects, boxes within IoU 0.9, on these tiles. bf16 moves more than that elsewhere: over the 25 tiles of
``out/bench/nwpu_mosaic_2048.tif`` 8% of the matched boxes above 0.5 had an IoU under 0.9 with ONNX Runtime's
(median 0.98), so these tests pin the typical case, not a bound. All one thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_engine import cli
from rs_engine import runtime as rt
from rs_engine.card import bundled_models, read_card
from rs_engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "nwpu_021.jpg"  # a real NWPU VHR-10 image, 1356 x 939 px
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # a plain JPEG crop
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="OpenVINO is not installed (pip install 'delineate[openvino]')")
#: (row, col) of 512 px windows of EXAMPLE: 5 and 3 objects over the score floor (nwpu10 0.6, ONNX Runtime).
WINDOWS = [(0, 0), (400, 800)]


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    """Normalised (3, 512, 512) float32 tiles of EXAMPLE, as the pipeline reads them, then a tile of band means
    (0 after normalisation: what the pipeline feeds for nodata and padding), where nwpu10 finds nothing. (Every
    512 px window of the example holds an object for nwpu10 0.6; 0.5 found none in the window at (427, 844).)"""
    card = read_card("nwpu10")
    mean, std = np.float32(card.mean)[:, None, None], np.float32(card.std)[:, None, None]
    with rasterio.open(EXAMPLE) as ds:
        windows = [(ds.read([1, 2, 3], window=((r, r + 512), (c, c + 512))).astype(np.float32) - mean) / std
                   for r, c in WINDOWS]
    return [*windows, np.zeros((3, 512, 512), np.float32)]


@pytest.fixture(scope="module")
def onnx_outputs(tiles) -> list[dict[str, np.ndarray]]:
    pred, _ = rt.load_predictor("nwpu10", runtime="onnx", threads=1)
    return [pred([t])[0] for t in tiles]


def _openvino(monkeypatch, precision: str | None, streams: int = 1) -> rt.OpenVinoPredictor:
    if precision:
        monkeypatch.setenv(rt.PRECISION_ENV, precision)
    else:
        monkeypatch.delenv(rt.PRECISION_ENV, raising=False)
    pred, _ = rt.load_predictor("nwpu10", runtime="openvino", device="cpu", threads=1, streams=streams)
    assert isinstance(pred, rt.OpenVinoPredictor) and pred.input_shape == (3, 512, 512)
    return pred


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) x1y1x2y2 boxes -> (N, M) IoU."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda z: (z[:, 2:] - z[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@needs_openvino
def test_f32_gives_onnx_runtimes_detections(tiles, onnx_outputs, monkeypatch):
    """Same graph, same float32 arithmetic up to summation order: outputs agree to 1e-3, in ONNX_OUTPUTS order."""
    pred = _openvino(monkeypatch, "f32")
    assert pred.precision == "f32"
    for tile, ref in zip(tiles, onnx_outputs, strict=True):
        out = pred([tile])[0]
        assert list(out) == list(rt.ONNX_OUTPUTS)
        for name in rt.ONNX_OUTPUTS:
            assert out[name].shape == ref[name].shape and out[name].dtype == ref[name].dtype, name
        np.testing.assert_array_equal(out["labels"], ref["labels"])
        np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-3)
        np.testing.assert_allclose(out["boxes"], ref["boxes"], atol=0.05)  # pixels
        np.testing.assert_allclose(out["roi_masks"], ref["roi_masks"], atol=1e-3)
    assert [len(o["scores"]) for o in onnx_outputs][-1] == 0  # the empty tile stays empty (OpenVINO's If fix)


@needs_openvino
def test_float_precision_finds_the_same_objects(tiles, onnx_outputs, monkeypatch):
    """``float``: OpenVINO's own default (bf16 where the CPU has it), never the int8 file (tests/test_int8.py)."""
    pred = _openvino(monkeypatch, "float")
    assert pred.precision in ("f32", "bf16")
    for tile, ref in zip(tiles, onnx_outputs, strict=True):
        out = pred([tile])[0]
        a, b = ref["scores"] > 0.5, out["scores"] > 0.5
        assert abs(int(a.sum()) - int(b.sum())) <= 1
        if a.any():
            iou = _box_iou(ref["boxes"][a], out["boxes"][b])
            best = iou.argmax(1)
            assert iou.max(1).min() > 0.9, iou.max(1)
            np.testing.assert_array_equal(out["labels"][b][best], ref["labels"][a])


@needs_openvino
def test_no_detection_is_empty_even_after_a_tile_with_some(tiles, monkeypatch):
    """OpenVINO's ONNX reader made the empty NMS branch a scalar: one stale detection came back instead of none."""
    pred = _openvino(monkeypatch, None)
    assert len(pred([tiles[0]])[0]["scores"]) >= 1
    out = pred([tiles[-1]])[0]
    assert {k: v.shape for k, v in out.items()} == {"boxes": (0, 4), "labels": (0,), "scores": (0,),
                                                    "roi_masks": (0, 1, 28, 28)}
    assert rt._restore_empty_branches(rt._openvino_core().read_model(str(pred.path))) == 2  # RPN and box head NMS


@needs_openvino
def test_two_streams_predict_at_once_as_one_does(tiles, monkeypatch):
    """The pipeline's streams call one predictor from several threads: each takes its own infer request."""
    one = _openvino(monkeypatch, None)
    two = _openvino(monkeypatch, None, streams=2)
    assert two.compiled.get_property("NUM_STREAMS") == 2
    work = tiles[:2] * 2
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda t: two([t])[0], work))
    for tile, out in zip(work, outs, strict=True):
        ref = one([tile])[0]
        np.testing.assert_array_equal(out["labels"], ref["labels"])
        np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-4)


@needs_openvino
def test_segment_cli_runs_openvino_end_to_end(tmp_path, read_gpkg):
    raster = tmp_path / "crop.tif"
    with rasterio.open(EXAMPLE) as ds:
        pixels = ds.read(window=((0, 512), (0, 512)))
    with rasterio.open(raster, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8") as dst:
        dst.write(pixels)
    out = tmp_path / "out.gpkg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(rt.PRECISION_ENV, None)
    r = subprocess.run([sys.executable, "-m", "rs_engine.cli", "segment", str(raster), "-o", str(out),
                        "--runtime", "openvino", "--progress", "jsonl"], capture_output=True, text=True, env=env,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout.splitlines()[-1])
    assert done["event"] == "done" and done["runtime"] == "openvino"
    assert done["precision"] in rt.OPENVINO_PRECISIONS
    assert done["scan"] == "fused"  # the bundled .safetensors sits beside the .onnx: the scans run in the C kernel
    _, rows = read_gpkg(out)
    assert len(rows) == done["features"] >= 3
    assert {row["class_name"] for row in rows} <= set(read_card("nwpu10").class_names)


def test_missing_openvino_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rt, "openvino_available", lambda: False)
    out = tmp_path / "out.gpkg"
    assert cli.main(["segment", str(EXAMPLE), "-o", str(out), "--runtime", "openvino"]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert err == "rs-engine: error: --runtime openvino: OpenVINO is not installed (pip install openvino)\n"
    assert not out.exists()


@needs_openvino
def test_bad_openvino_settings_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(rt.PRECISION_ENV, "f64")
    out = tmp_path / "out.gpkg"
    assert cli.main(["segment", str(EXAMPLE), "-o", str(out), "--runtime", "openvino"]) == cli.EXIT_INPUT
    assert capsys.readouterr().err == (f"rs-engine: error: {rt.PRECISION_ENV}=f64: use one of f32, bf16, f16, int8, "
                                       "float (or leave it unset)\n")
    assert not out.exists()
    monkeypatch.delenv(rt.PRECISION_ENV)
    with pytest.raises(InputError, match="--runtime openvino runs on the CPU"):
        rt.load_predictor("nwpu10", runtime="openvino", device="cuda")
    with pytest.raises(InputError, match="runs with --runtime torch, not openvino"):
        rt.load_predictor(bundled_models(".safetensors")["nwpu10"], runtime="openvino")


@needs_openvino
def test_compiled_models_are_cached_where_asked(tmp_path, monkeypatch):
    """Default: the user cache (as the fused scan kernel); DELINEATE_OPENVINO_CACHE moves it, ``off`` disables it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(rt.CACHE_ENV, raising=False)
    assert rt.openvino_cache_dir() == str(tmp_path / "xdg" / "delineate" / "openvino")
    monkeypatch.setenv(rt.CACHE_ENV, "off")
    assert rt.openvino_cache_dir() is None
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "ov"))
    monkeypatch.setenv(rt.PRECISION_ENV, "f32")
    monkeypatch.setenv(rt.SCAN_ENV, "graph")  # the fused-scan graph keeps no compiled blob (a Python operation)
    rt._compiled.cache_clear()  # compile again in this process, not the test module's compiled model
    try:
        rt.load_predictor("nwpu10", runtime="openvino", device="cpu", threads=1)
    finally:
        rt._compiled.cache_clear()
    assert any(p.stat().st_size > 1_000_000 for p in (tmp_path / "ov").iterdir())  # the compiled blob
    (tmp_path / "ro").write_text("a file where the folder should be")
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "ro" / "sub"))
    assert rt.openvino_cache_dir() is None  # cannot be made: compile every run, no error


@needs_openvino
def test_fused_scan_is_one_node_per_scan_and_finds_what_the_exported_scan_finds(tiles, tmp_path, monkeypatch):
    """The default: each selective scan one ``delineate::SelectiveScan`` node that OpenVINO runs as a reference
    (Python) node calling the fused C kernel; at f32 the same detections as the exported standard-operator scan."""
    import onnx

    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path / "ov"))
    monkeypatch.setenv(rt.SCAN_ENV, "graph")
    graph = _openvino(monkeypatch, "f32")
    monkeypatch.delenv(rt.SCAN_ENV)
    fused = _openvino(monkeypatch, "f32")
    assert (graph.scan, fused.scan) == ("graph", "fused")
    [made] = (tmp_path / "ov" / "scan-graphs").glob("nwpu10-*.onnx")  # exported once, kept in the cache folder
    nodes = onnx.load(str(made)).graph.node
    scans = [n for n in nodes if n.op_type == "SelectiveScan"]
    assert len(scans) == 6 and {n.domain for n in scans} == {"delineate"}  # 4 SS2D blocks at stride 16, 2 at 32
    exported = onnx.load(str(graph.path)).graph.node
    mixer = lambda ns: sum("/mixer/" in n.name for n in ns)  # noqa: E731  (the SS2D blocks' nodes)
    assert mixer(nodes) < 0.25 * mixer(exported)  # no unrolled scans left (about 950 nodes against 4200)
    kinds = {op.get_rt_info()["layerType"].astype(str) for op in fused.compiled.get_runtime_model().get_ordered_ops()}
    assert "Reference" in kinds  # the Python operation, not a decomposition
    for tile in tiles:
        a, b = graph([tile])[0], fused([tile])[0]
        np.testing.assert_array_equal(b["labels"], a["labels"])
        np.testing.assert_allclose(b["scores"], a["scores"], atol=1e-4)
        np.testing.assert_allclose(b["boxes"], a["boxes"], atol=0.05)  # pixels
        np.testing.assert_allclose(b["roi_masks"], a["roi_masks"], atol=1e-3)


@needs_openvino
def test_fused_scan_needs_the_weights_beside_the_onnx_file(tmp_path, monkeypatch):
    """An .onnx alone (no .safetensors beside it) runs its exported scan; a bad DELINEATE_OPENVINO_SCAN is one line."""
    alone = tmp_path / "model.onnx"
    alone.write_bytes(rt.model_file("nwpu10", "openvino").read_bytes())
    monkeypatch.delenv(rt.SCAN_ENV, raising=False)
    pred, _ = rt.load_predictor(alone, runtime="openvino", threads=1)
    assert pred.scan == "graph"
    # weights of another model beside it (as after retraining without a new export): not used either
    alone.with_suffix(".safetensors").write_bytes(bundled_models(".safetensors")["ssdd-ship"].read_bytes())
    pred, _ = rt.load_predictor(alone, runtime="openvino", threads=1)
    assert pred.scan == "graph"
    monkeypatch.setenv(rt.SCAN_ENV, "kernel")
    with pytest.raises(InputError, match=f"^{rt.SCAN_ENV}=kernel: use fused or graph \\(or leave it unset\\)$"):
        rt.load_predictor("nwpu10", runtime="openvino", threads=1)


@needs_openvino
def test_auto_takes_openvino_on_the_cpu_where_the_exported_graph_serves(tmp_path):
    """``--runtime auto``: OpenVINO for bundled models and .onnx files on the CPU; PyTorch for a .safetensors path
    (its .onnx sibling may be older), for CUDA, and where the options need another graph than the exported one."""
    from rs_engine import SegmentOptions, segment

    weights = bundled_models(".safetensors")["nwpu10"]
    assert rt.choose_runtime("nwpu10", "auto", "cpu") == "openvino"
    assert rt.choose_runtime(weights.with_suffix(".onnx"), "auto", "cpu") == "openvino"
    assert rt.choose_runtime(weights, "auto", "cpu") == "torch"
    assert rt.choose_runtime("nwpu10", "auto", "cuda") == "torch"
    raster = tmp_path / "crop.tif"
    with rasterio.open(EXAMPLE) as ds:
        pixels = ds.read(window=((0, 256), (0, 256)))
    with rasterio.open(raster, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8") as dst:
        dst.write(pixels)
    ran = [segment([raster], tmp_path / f"{i}.gpkg", SegmentOptions(threads=1, **kw)).runtime
           for i, kw in enumerate([{}, {"tile_size": 256}, {"score_threshold": 0.3}, {"score_threshold": 0.7}])]
    assert ran == ["openvino", "torch", "torch", "openvino"]  # exported: 512 px tiles, floor 0.5


@needs_openvino
def test_openvino_calls_back_into_python_off_the_main_thread(tiles, monkeypatch):
    """Python runs signal handlers on the main thread: a cancel's KeyboardInterrupt raised inside the scan
    operation was thrown through OpenVINO's C++ and hung the run (1 in 4 cancels) until the plugin killed it."""
    import threading

    from rs_engine import runtime_openvino as rov

    pred = _openvino(monkeypatch, None)
    assert pred.scan == "fused"
    op = rov._selective_scan_op_class()
    evaluate, on_main = op.evaluate, []

    def spy(self, outputs, inputs):  # noqa: ANN001, ANN202
        on_main.append(threading.current_thread() is threading.main_thread())
        return evaluate(self, outputs, inputs)

    monkeypatch.setattr(op, "evaluate", spy)
    pred([tiles[0]])
    assert len(on_main) == 6 and not any(on_main)


@needs_openvino
def test_cancel_by_sigterm_mid_run_is_exit_130(tmp_path):
    """SIGTERM (the QGIS plugin's cancel) mid-run with OpenVINO: cancelled, exit 130, nothing written."""
    import signal

    big = tmp_path / "big.tif"
    with rasterio.open(EXAMPLE) as ds:
        pixels = np.tile(ds.read(window=((0, 900), (0, 900))), (1, 2, 2))
    with rasterio.open(big, "w", driver="GTiff", width=1800, height=1800, count=3, dtype="uint8") as dst:
        dst.write(pixels)
    out = tmp_path / "o.gpkg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rs_engine.cli", "segment", str(big), "-o", str(out),
                             "--runtime", "openvino", "--progress", "jsonl"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["done"] >= 1:
            proc.send_signal(signal.SIGTERM)
            break
    rest = [json.loads(line) for line in proc.stdout]
    proc.wait(timeout=60)
    assert proc.returncode == 130, proc.stderr.read()
    assert rest[-1] == {"event": "cancelled"} and not out.exists()


@needs_openvino
def test_fused_scan_without_a_cache_folder_leaves_no_temporary_file(tmp_path, monkeypatch):
    """DELINEATE_OPENVINO_CACHE=off: the fused-scan graph is exported to a temporary folder, compiled, removed."""
    import tempfile

    monkeypatch.setenv(rt.CACHE_ENV, "off")
    monkeypatch.delenv(rt.SCAN_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pred, _ = rt.load_predictor("nwpu10", runtime="openvino", threads=1)
    assert pred.scan == "fused" and list(tmp_path.iterdir()) == []


@needs_openvino
def test_auto_without_pytorch_takes_openvino_for_exported_models(monkeypatch):
    """OpenVINO installed beside the light engine: auto runs it (the exported scan), not ONNX Runtime."""
    monkeypatch.setattr(rt, "torch_available", lambda: False)
    monkeypatch.setattr(rt, "_nvidia_driver", lambda: False)
    assert rt.choose_runtime("nwpu10", "auto", "auto") == "openvino"
    assert rt.choose_runtime("nwpu10", "auto", "cuda") == "onnx"
    monkeypatch.setattr(rt, "_nvidia_driver", lambda: True)  # maybe a GPU: ONNX Runtime's CUDA provider
    assert rt.choose_runtime("nwpu10", "auto", "auto") == "onnx"
    monkeypatch.setattr(rt, "openvino_available", lambda: False)
    assert rt.choose_runtime("nwpu10", "auto", "cpu") == "onnx"
