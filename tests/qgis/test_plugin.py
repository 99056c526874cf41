"""The plugin in real QGIS (Debian's python3-qgis, offscreen). Every scenario runs in its own QGIS process under
/usr/bin/python3: this pytest process imports torch, and PyQGIS and the engine's stack must never meet in one
process. The scenario scripts print one JSON line of facts; the assertions are here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QGIS_PYTHON = "/usr/bin/python3"
SHARED = ROOT.parent / "shared" / "data" / "spacenet_samples"


def _has_qgis() -> bool:
    r = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True)
    return r.returncode == 0


def _has_engine() -> bool:
    return (ROOT / ".venv" / "bin" / "python").exists()


pytestmark = pytest.mark.skipif(not _has_qgis(), reason="PyQGIS missing (make test installs python3-qgis)")
needs_engine = pytest.mark.skipif(not _has_engine(), reason="no .venv with the engine (make venv)")
needs_spacenet = pytest.mark.skipif(not (SHARED / "geotiff_labels.geojson").exists(),
                                    reason=f"SpaceNet samples missing at {SHARED}")
needs_xyz = pytest.mark.skipif(
    not (shutil.which("gdal2tiles.py") or shutil.which("gdal2tiles")) or not shutil.which("gdal_translate"),
    reason="gdal2tiles / gdal_translate missing (apt-get install gdal-bin python3-gdal)")


def _env(tmp: Path) -> dict[str, str]:
    """Environment of a QGIS process: offscreen, one engine thread, no .aux.xml beside inputs, and its temporary
    files (QGIS's, the dock's temporary outputs) under ``tmp``."""
    (tmp / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1", GDAL_PAM_ENABLED="NO",
               TMPDIR=str(tmp / "tmp"), XDG_RUNTIME_DIR=str(tmp / "tmp"))
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _scenario(script: str, workdir: Path, *args: str, timeout: int = 300) -> dict:
    """Run a scenario script in its own QGIS process; its last stdout line is a JSON object of facts."""
    r = subprocess.run([QGIS_PYTHON, str(HERE / script), *args, str(workdir)], capture_output=True, text=True,
                       timeout=timeout, env=_env(workdir), cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert facts["engine_modules_loaded"] == [], "the plugin must never import the engine's stack"
    return facts


def test_metadata_has_required_fields() -> None:
    import configparser

    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    g = meta["general"]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                "repository"):
        assert g.get(key), key
    assert g["hasProcessingProvider"] == "yes"
    assert g["qgisMinimumVersion"] == "3.22" and g["qgisMaximumVersion"] == "3.99"


def test_plugin_zip(tmp_path: Path) -> None:
    import subprocess as sp
    import zipfile

    out = tmp_path / "delineate.zip"
    sp.run([QGIS_PYTHON, str(ROOT / "qgis_plugin" / "build_zip.py"), str(out), "--no-wheel"], check=True)
    names = zipfile.ZipFile(out).namelist()
    assert "delineate/__init__.py" in names and "delineate/metadata.txt" in names
    assert "delineate/processing_provider.py" in names
    assert all(n.startswith("delineate/") for n in names)
    assert not any("__pycache__" in n or "build_zip" in n for n in names)


@needs_engine
def test_plugin_loads_and_unloads_cleanly(tmp_path: Path) -> None:
    facts = _scenario("plugin_smoke.py", tmp_path, timeout=180)
    assert facts["qgis"].startswith("3.")
    assert facts["added"] == facts["actions"] == facts["menu_entries"] >= 1
    assert facts["removed"] == facts["added"] and facts["left"] == 0 and facts["menu_left"] == 0
    assert facts["toolbar_added"] == facts["toolbar_removed"] == 1
    assert facts["provider_loaded"] and not facts["provider_left"]
    assert facts["algorithms"] == ["delineate:finetune", "delineate:segment"]
    assert facts["models_listed"] and {"nwpu10", "ssdd-ship"} <= set(facts["models"])
    assert facts["running_at_unload"], "the scenario should unload while the engine is running"
    assert "torch" in facts["doctor"] and "bundled_models" in facts["doctor"], facts["doctor"]
    assert "/nonexistent/python" in facts["bad_engine"] and "Settings" in facts["bad_engine"]
    assert facts["children_before_unload"] == 2 and facts["children_left"] == []
    assert facts["unload_output_left"] == []
    assert facts["docks_left"] == 0 and facts["processes_left"] == 0 and facts["actions_left"] == 0


@needs_engine
def test_dock_segments_two_rasters_into_styled_layers_in_raster_crs(tmp_path: Path) -> None:
    facts = _scenario("dock_scenarios.py", tmp_path, "segment")
    assert facts["ok"], facts["message"]
    assert facts["tile_prefilled"] == 256 and facts["score_prefilled"] == 0.5  # from the ssdd-ship card
    layers = facts["layers"]
    assert sorted(lyr["name"] for lyr in layers) == ["ssdd A - ssdd-ship", "ssdd B - ssdd-ship"]
    assert len({lyr["source"] for lyr in layers}) == 2
    for lyr in layers:
        assert 8 <= lyr["features"] <= 30  # the canvas shows the upper-left 300 x 200 m: 18 annotated ships
        assert lyr["crs"] == facts["raster_crs"] == "EPSG:32616"
        assert lyr["renderer"] == "categorizedSymbol" and lyr["class_attribute"] == "class_name"
        assert lyr["categories"] == ["ship"]
        assert {"class_id", "class_name", "score", "area", "source", "model", "run_id"} <= set(lyr["fields"])
        assert lyr["scores_ok"] and lyr["editable"] and lyr["start_editing"]
        assert lyr["within_canvas_extent"], "the map canvas extent was not honoured"
    assert facts["processes_left"] == 0


@needs_engine
def test_dock_cancel_leaves_no_layer_and_no_file(tmp_path: Path) -> None:
    facts = _scenario("dock_scenarios.py", tmp_path, "cancel")
    assert facts["progress_hooks"] == [1], "cancel must happen mid-run"
    assert facts["cancelled"] and not facts["ok"] and facts["exit_code"] == 130
    assert facts["layers_added"] == 0 and not facts["output_exists"]
    assert facts["leftovers"] == [] and facts["temp_leftovers"] == []
    assert facts["buttons_reset"] and facts["processes_left"] == 0


@needs_engine
def test_dock_shows_engine_error_message(tmp_path: Path) -> None:
    facts = _scenario("dock_scenarios.py", tmp_path, "error")
    assert not facts["ok"] and facts["exit_code"] == 2
    assert "--bands 5" in facts["message"] and "no band 5" in facts["message"]
    assert [facts["message"], 2] in facts["bar_messages"]  # Qgis.Critical
    assert facts["layers_added"] == 0 and not facts["output_exists"]


@needs_engine
def test_dock_reports_killed_engine_and_next_run_works(tmp_path: Path) -> None:
    facts = _scenario("dock_scenarios.py", tmp_path, "kill")
    assert facts["progress_hooks"][0] == 1
    assert not facts["first"]["ok"] and not facts["first"]["cancelled"]
    assert facts["first"]["message"].startswith("engine stopped unexpectedly (exit -9")
    assert any(m.startswith("engine stopped unexpectedly") for m, _level in facts["bar_messages"])
    assert facts["layers_after_kill"] == 0 and facts["leftovers_after_kill"] == []
    assert facts["second"]["ok"], facts["second"]["message"]
    assert facts["layers_after_second"] and facts["layers_after_second"][0][1] > 0
    assert facts["second_within_selection"], "the selected features' extent was not honoured"


@needs_engine
def test_processing_segment_headless(tmp_path: Path) -> None:
    facts = _scenario("processing_scenarios.py", tmp_path, "segment")
    assert facts["result"]["valid"] and 12 <= facts["result"]["features"] <= 40  # 24 ships annotated
    assert facts["result"]["crs"] == "EPSG:32616"
    assert facts["progress_max"] == 100
    assert "model file not found" in facts["error"] and not facts["bad_output_exists"]


@needs_engine
@needs_spacenet
@pytest.mark.slow
def test_processing_finetune_headless(tmp_path: Path) -> None:
    facts = _scenario("processing_scenarios.py", tmp_path, "finetune", timeout=400)
    assert facts["model_exists"] and facts["registered"]
    assert facts["progress_max"] == 100 and facts["epoch_lines"]
    assert facts["mask_ap"] is not None
    assert facts["segment_with_new_model"]["valid"] and facts["segment_with_new_model"]["crs"] == "EPSG:32616"


@needs_engine
@needs_xyz
def test_dock_renders_web_layer_then_segments(tmp_path: Path) -> None:
    facts = _scenario("dock_scenarios.py", tmp_path, "web")
    assert facts["web_valid"] and facts["bands_prefilled"] == "1"
    assert facts["ok"], facts["message"]
    assert "rendering" in facts["log"] and "render_local_xyz" in facts["log"]
    assert facts["layers"] and facts["layers"][0][0] == "local xyz - ssdd-ship"
    assert facts["layers"][0][2] == facts["web_crs"] == "EPSG:3857"
    assert facts["renders_left"] == [], "the rendered GeoTIFF must be removed after the run"


@needs_engine
def test_dock_single_band_raster_with_three_band_model(tmp_path: Path) -> None:
    """A 1-band raster with the 3-band nwpu10 in the dock: no band pre-check (the bands field stays empty), the run
    adds a layer, and the engine's band-1-repeated notice is in the dock's log and the QGIS log as a warning."""
    facts = _scenario("dock_scenarios.py", tmp_path, "pan")
    assert facts["bands_prefilled"] == ""
    assert facts["ok"], facts["message"]
    assert facts["layers"] and facts["layers"][0][0] == "atlanta - nwpu10" and facts["layers"][0][2] == "EPSG:32616"
    notice = "spacenet_atlanta.tif: has 1 band, model nwpu10"
    assert f"warning: {notice}" in facts["log"], facts["log"]
    assert any(m.startswith(notice) and m.endswith("repeating band 1 (as --bands 1,1,1)")
               for m in facts["warnings_logged"]), facts["warnings_logged"]


@needs_engine
@needs_spacenet
@pytest.mark.slow
def test_dock_retrain_registers_new_model(tmp_path: Path) -> None:
    facts = _scenario("dock_scenarios.py", tmp_path, "retrain")
    assert facts["labels_modified"] and facts["labels_exported"], "unsaved edits must go through a GeoPackage"
    assert facts["ok"], facts["message"]
    assert facts["model_exists"] and facts["registered"] and facts["in_model_list"]
    assert facts["selected_model"] == str(tmp_path / "retrained.safetensors")
    assert facts["progress"] == 100 and facts["epoch_logged"]
    assert facts["processes_left"] == 0


def _model_with_gsd(name: str, dest: Path, gsd: float) -> Path:
    """A copy of the bundled model ``name`` whose card says ``gsd`` m/px, written with the standard library (a
    safetensors file: 8-byte little-endian header length, a JSON header whose ``__metadata__`` holds the card, then
    the tensor data, addressed relative to the header's end)."""
    data = (ROOT / "rs_engine" / "weights" / f"{name}.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    card = json.loads(header["__metadata__"]["model_card"])
    card["gsd"] = gsd
    header["__metadata__"]["model_card"] = json.dumps(card, sort_keys=True)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    dest.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])
    return dest


@needs_engine
@needs_xyz
def test_processing_renders_web_layer_at_model_gsd_with_model_bands(tmp_path: Path) -> None:
    """delineate:segment on an XYZ layer with a 1-band model whose card says 2 m/px: the layer is rendered at 2 m/px
    (EPSG:3857 units) and the engine gets one band (it used to be rendered at the layer's resolution and given
    --bands 1,2,3, which the engine refuses for a 1-band model)."""
    _model_with_gsd("ssdd-ship", tmp_path / "ssdd-ship-2m.safetensors", 2.0)
    facts = _scenario("processing_scenarios.py", tmp_path, "web")
    assert facts["web_valid"] and facts["web_crs"] == "EPSG:3857"
    assert facts["error"] is None, facts["error"]
    assert facts["bands"] == ["1"], facts["segment_commands"]
    assert len(facts["rendered"]) == 1 and facts["rendered"][0]["crs"] == "3857"
    assert facts["rendered"][0]["pixel"] == pytest.approx([2.0, 2.0], rel=1e-3), facts["rendered"]
    assert facts["result"]["valid"] and facts["result"]["crs"] == "EPSG:3857"
    assert facts["renders_left"] == [], "the rendered GeoTIFF must be removed after the run"


@needs_engine
@pytest.mark.skipif(not (SHARED / "pan1.tif").exists(), reason=f"SpaceNet samples missing at {SHARED}")
def test_processing_single_band_raster_with_three_band_model(tmp_path: Path) -> None:
    """The SpaceNet panchromatic raster (1 band) with the default optical model nwpu10 (3 bands), no BANDS: band 1
    is repeated (as --bands 1,1,1), the run ends with a layer, and the notice is in the feedback as a warning."""
    facts = _scenario("processing_scenarios.py", tmp_path, "pan")
    assert facts["pan_bands"] == 1
    assert facts["error"] is None, facts["error"]
    assert facts["result"]["valid"] and facts["result"]["crs"] == "EPSG:32631"
    assert facts["bands"] in (["1,1,1"], [None]), facts["bands"]  # the plugin's choice, or the engine's
    notices = [w for w in facts["warnings"] if "has 1 band, model nwpu10" in w]
    assert len(notices) == 1 and notices[0].endswith("takes 3: repeating band 1 (as --bands 1,1,1)"), facts


@needs_engine
def test_processing_batch_over_two_layers(tmp_path: Path) -> None:
    """Processing's batch dialog runs delineate:segment over two raster layers: two GeoPackages, each segmented
    within its own raster, loaded into the project named after raster and model and styled by class."""
    facts = _scenario("processing_scenarios.py", tmp_path, "batch")
    assert facts["rows"] == 2
    whole, left = facts["outputs"]
    assert whole and left, facts["log"]
    assert whole["valid"] and left["valid"] and whole["crs"] == left["crs"] == "EPSG:32616"
    assert 12 <= whole["features"] <= 40  # 24 ships annotated
    assert 1 <= left["features"] < whole["features"] and facts["left_extent_ok"]
    loaded = {lyr["name"]: lyr for lyr in facts["loaded"]}
    assert set(loaded) == {"ssdd whole - ssdd-ship", "ssdd left - ssdd-ship"}, facts["loaded"]
    assert loaded["ssdd left - ssdd-ship"]["source"] == str(tmp_path / "batch_left.gpkg")
    for lyr in loaded.values():
        assert lyr["renderer"] == "categorizedSymbol" and lyr["class_attribute"] == "class_name"


@needs_engine
def test_processing_model_segment_then_native_algorithm(tmp_path: Path) -> None:
    """A Processing model as Model Builder saves it (.model3, read back), delineate:segment then
    native:pointonsurface, run headless: both outputs written, one point inside each ship outline."""
    facts = _scenario("processing_scenarios.py", tmp_path, "model")
    assert facts["saved"] and facts["read_back"]
    instances, points = facts["instances"], facts["points"]
    assert instances["valid"] and 12 <= instances["features"] <= 40 and instances["crs"] == "EPSG:32616"
    assert points["valid"] and points["features"] == instances["features"] and points["crs"] == "EPSG:32616"
    assert points["geometry"] == 0 and "score" in points["fields"]  # QgsWkbTypes.PointGeometry
    assert facts["points_inside"]


def _qgis_process() -> str | None:
    # Debian's /usr/bin/qgis_process wrapper adds --noversioncheck, which qgis_process rejects: use the binary
    return shutil.which("qgis_process.bin", path="/usr/bin") or shutil.which("qgis_process")


@needs_engine
@pytest.mark.skipif(_qgis_process() is None, reason="qgis_process missing (apt-get install qgis)")
def test_qgis_process_runs_segment(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from qgis_profile import make_profile

    profiles = make_profile(tmp_path / "config", str(ROOT / ".venv" / "bin" / "python"))
    env = dict(_env(tmp_path), QGIS_CUSTOM_CONFIG_PATH=str(profiles))
    out = tmp_path / "qp.gpkg"
    r = subprocess.run([_qgis_process(), "--json", "run", "delineate:segment", "--",
                        f"INPUT={ROOT / 'examples' / 'spacenet_atlanta.tif'}", "MODEL=ssdd-ship", "BANDS=1",
                        "EXTENT=733601,733751,3724989,3725139 [EPSG:32616]", f"OUTPUT={out}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert json.loads(r.stdout)["results"]["OUTPUT"] == str(out)
    assert out.is_file()


@needs_engine
@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("qgis") and shutil.which("xvfb-run")),
                    reason="QGIS desktop or xvfb-run missing (apt-get install qgis xvfb)")
def test_desktop_qgis_dock_screenshot(tmp_path: Path) -> None:
    """The real QGIS desktop under Xvfb, plugin installed from its zip: the dock segments and a screenshot is
    saved (docs/img/dock.png is made by the same script)."""
    png = tmp_path / "dock.png"
    env = _env(tmp_path)
    r = subprocess.run([QGIS_PYTHON, str(HERE / "desktop_run.py"), str(png)], capture_output=True, text=True,
                       timeout=450, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert "delineate" in facts["plugins"] and facts["ok"], facts
    # The SpaceNet suburb holds no ships: ssdd-ship 0.4 marks none there (0.3 marked false ones), so the layer may
    # be empty; feature counts are checked on the SAR example by the offscreen tests above.
    assert facts["layers"] and facts["layers"][0][1] >= 0 and facts["layers"][0][2] == "EPSG:32616"
    assert facts["saved"] and png.stat().st_size > 50_000
