"""The Outline map tool (issue 16) in real QGIS: each scenario of outline_scenarios.py runs in its own QGIS process
under /usr/bin/python3 (see test_plugin.py) and prints one JSON line of facts; the assertions are here.
``pytest -s`` prints the latency of each click."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_plugin import _has_qgis, _scenario, needs_engine, needs_xyz

pytestmark = [pytest.mark.qgis,
              pytest.mark.skipif(not _has_qgis(), reason="PyQGIS missing (make test installs python3-qgis)")]


@needs_engine
@needs_xyz
def test_outline_tool_two_clicks_two_features_with_the_engine(tmp_path: Path) -> None:
    """Two clicks on two ships of the SAR example (rs-engine serve, ssdd-ship): two features in the editable
    layer "Delineate outlines", each holding its click; undo removes the last one; a box; a web layer with nwpu10;
    the engine ends with the plugin."""
    facts = _scenario("outline_scenarios.py", tmp_path, "real", timeout=600)
    print(f"\noutline tool, rs-engine serve with ssdd-ship: model loaded in {facts['load_seconds']:.2f} s; "
          f"click latencies {', '.join(f'{s:.3f}' for s in facts['latencies'])} s (engine "
          f"{', '.join(f'{s:.3f}' for s in facts['engine_seconds'])} s, embedded {facts['embedded']}); "
          f"same window again {facts['latency_again']:.3f} s (embedded {facts['embedded_again']}); box "
          f"{facts['box']['seconds']:.3f} s; web layer with nwpu10 {facts['web']['seconds']:.3f} s (render "
          f"{facts['web']['render_seconds']:.3f} s, found: {facts['web']['found']})")
    assert facts["ready"]["event"] == "ready" and "ship" in facts["ready"]["classes"], facts["ready"]
    assert all(fid is not None for fid in facts["fids"]), (facts["replies"], facts["bar_messages"])
    assert facts["features"] == 2 and facts["editable"] and facts["crs"] == "EPSG:32616"
    assert facts["contains_click"] == [True, True], facts["replies"]
    for prompt_id, (pid, class_name, score, model) in enumerate(facts["attributes"], 1):
        assert pid == prompt_id and class_name == "ship" and 0 <= score <= 1 and model.startswith("ssdd-ship")
    assert all(20 <= area <= 400 for area in facts["areas"]), facts["areas"]  # ships of ~60 px at 1 m
    assert facts["after_undo"] == 2 and facts["after_two_undos"] == 1
    assert max(facts["latencies"]) < 30
    assert facts["box"]["fid"] is not None and facts["box"]["contains"] and facts["box"]["class_name"] == "ship"
    web = facts["web"]  # nwpu10 on the rendered tile: an outline or "nothing here", never an error
    assert web["event"] == "outline" and web["model"] == "nwpu10" and web["renders_left"] == [], web
    assert facts["children_left"] == [] and facts["processes_left"] == 0 and not facts["tool_left"]


@needs_engine
@needs_xyz
def test_outline_tool_paths_with_a_fake_engine(tmp_path: Path) -> None:
    """The tool against tests/qgis/fake_serve.py (same protocol): clicks reprojected from the canvas CRS, a box, no
    object, an error, a web layer rendered one tile around the click, a killed engine, a model change, unload."""
    facts = _scenario("outline_scenarios.py", tmp_path, "fake")
    assert facts["features"] == 2 and facts["editable"] and facts["crs"] == "EPSG:32616"
    assert facts["fields"] == ["prompt_id", "class_name", "score", "model"]
    assert facts["contains_click"] == [True, True] and facts["prompt_ids"] == [1, 2]
    assert facts["after_undo"] == 1
    assert facts["sync_embed"] == "embedded" and "nonexistent.tif" in facts["sync_error"]
    assert facts["rubber_band_shown"] and facts["after_box"] == 2
    assert facts["box_area"] == pytest.approx(40 * 40, rel=0.05)  # the fake outlines the box itself
    assert facts["nothing"] == {"fid": None, "wkt": None, "features": 2,
                                "messages": ["Outline: no object found here"]}
    assert facts["outside"]["event"] == "error" and facts["outside"]["features"] == 2
    assert "outside the raster" in facts["outside"]["messages"][0]
    web = facts["web"]
    assert web["fid"] is not None and web["features"] == 3 and web["renders_left"] == []
    assert web["raster_size"] == [web["model_tile"]] * 2  # one model tile at the model's GSD
    assert web["bands"] == ([1, 2, 3] if web["model_bands"] == 3 else [1] * web["model_bands"])
    pixel = facts["pixel_frame"]  # a raster without georeferencing
    assert pixel["fid"] is not None and not pixel["crs_valid"] and pixel["contains"]
    assert pixel["pixel"] == pytest.approx([700, 400], abs=3)  # a canvas pixel is ~1.5 image px
    assert len(facts["killed_messages"]) == 1
    assert facts["after_kill"]["fid"] is not None and facts["after_kill"]["pid_changed"]
    assert facts["after_model_change"] == {"client": "nwpu10", "old_alive": False}
    assert facts["button_after_pan"] is False and facts["features_final"] == 2
    assert facts["children_before_unload"] == 1
    assert facts["children_left"] == [] and facts["processes_left"] == 0 and not facts["tool_left"]
