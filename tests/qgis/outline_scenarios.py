"""Outline map tool scenarios in real QGIS (offscreen), one per process: ``python3 outline_scenarios.py SCENARIO
WORKDIR``. The tool gets mouse events as the canvas would send them (QgsMapMouseEvent press / release).

real:  the engine's ``rs-engine serve`` with ssdd-ship on the SAR example in UTM: two clicks on two ships -> two
       features in the editable layer "Delineate outlines", undo removes the last; the latency of each click; a
       box; then nwpu10 on a web (XYZ) layer, rendered one tile around the click.
fake:  tests/qgis/fake_serve.py stands in for the engine: clicks with the canvas in another CRS, a box, "no object
       found here", an error reply, a web (XYZ) layer rendered one tile around the click, the engine killed (the
       next click starts a new one), a model change (the old process ends), and unload (no process left).
Prints one JSON line of facts (last line of stdout).
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    ROOT,
    FakeIface,
    child_processes,
    flush_deletes,
    load_plugin,
    local_xyz_layer,
    report,
    sar_example_in_utm,
    spacenet_middle,
    wait_until,
)
from qgis.core import (  # noqa: E402
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.gui import QgsMapMouseEvent  # noqa: E402
from qgis.PyQt.QtCore import QEvent, QPoint, QProcess, Qt  # noqa: E402

from qgis_plugin.settings import EngineCommand  # noqa: E402

SCENARIO, WORK = sys.argv[1], sys.argv[2]
FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_serve.py")
UL = (733601.0, 3725139.0)  # upper-left corner of the SAR example in UTM 16N, 1 m pixels (harness)
SHIPS = [(200.0, 215.6), (175.5, 148.0)]  # (col, row) of two ships in examples/ssdd_001111.jpg (out/ssdd_001111.gpkg)
TIMEOUT = 180

iface = FakeIface()
iface.window.resize(1000, 700)
iface.window.show()
canvas = iface.canvas
plugin = load_plugin(iface)
dock = plugin.show_dock()
assert wait_until(lambda: bool(dock.catalog.models), 120), "engine did not list its models"
dock.select_model("ssdd-ship")
tab = dock.segment_tab
tool = tab.outline_tool
done: list = []
tool.outlined.connect(done.append)
facts: dict = {"scenario": SCENARIO}


def utm(col: float, row: float) -> QgsPointXY:
    return QgsPointXY(UL[0] + col, UL[1] - row)


def to_canvas(point: QgsPointXY, crs: QgsCoordinateReferenceSystem) -> QgsPointXY:
    dest = canvas.mapSettings().destinationCrs()
    return point if crs == dest else QgsCoordinateTransform(crs, dest, QgsProject.instance()).transform(point)


def mouse(kind: QEvent.Type, point: QgsPointXY) -> QgsMapMouseEvent:
    pixel = canvas.getCoordinateTransform().transform(point)
    return QgsMapMouseEvent(canvas, kind, QPoint(round(pixel.x()), round(pixel.y())), Qt.LeftButton,
                            Qt.LeftButton if kind != QEvent.MouseButtonRelease else Qt.NoButton, Qt.NoModifier)


def click(point: QgsPointXY, to: QgsPointXY | None = None, wait: bool = True) -> dict | None:
    """Press at ``point`` (canvas CRS), move to and release at ``to`` (a box) or at ``point`` (a click); wait
    for the tool's ``outlined``."""
    n = len(done)
    tool.canvasPressEvent(mouse(QEvent.MouseButtonPress, point))
    if to is not None:
        tool.canvasMoveEvent(mouse(QEvent.MouseMove, to))
        facts.setdefault("rubber_band_shown", tool._band is not None)
    tool.canvasReleaseEvent(mouse(QEvent.MouseButtonRelease, to or point))
    if wait:
        assert wait_until(lambda: len(done) > n, TIMEOUT), "no reply"
        return done[-1]
    return None


def outlines():
    from qgis_plugin.outline_tool import OUTLINE_LAYER

    layers = QgsProject.instance().mapLayersByName(OUTLINE_LAYER)
    return layers[0] if layers else None


def contains(layer, fid: int, point: QgsPointXY, crs: QgsCoordinateReferenceSystem, tolerance: float = 0) -> bool:
    here = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transform(point)
    return layer.getFeature(fid).geometry().buffer(tolerance, 4).contains(QgsGeometry.fromPointXY(here))


def switch_on() -> float:
    """Check the Outline button; returns the seconds until the engine has loaded its model."""
    t0 = time.perf_counter()
    tab.outline_button.click()
    assert canvas.mapTool() is tool, "the Outline button did not activate the map tool"
    tool.client.wait_ready(TIMEOUT)
    return time.perf_counter() - t0


sar = QgsRasterLayer(sar_example_in_utm(WORK), "ssdd utm")
QgsProject.instance().addMapLayer(sar)
dock.set_checked_rasters([sar.id()])

if SCENARIO == "real":
    canvas.setDestinationCrs(sar.crs())
    canvas.setExtent(QgsRectangle(utm(100, 250), utm(300, 50)))  # 200 m across 1000 px: 0.2 m per pixel
    canvas.refresh()
    facts["load_seconds"] = switch_on()
    facts["ready"] = tool.client.info
    replies = [click(utm(*ship)) for ship in SHIPS]
    layer = outlines()
    facts["latencies"] = [r["seconds"] for r in replies]
    facts["engine_seconds"] = [r["reply"].get("seconds") for r in replies]
    facts["embedded"] = [r["reply"].get("embedded") for r in replies]
    facts["replies"] = [{k: v for k, v in r["reply"].items() if k != "wkt"} for r in replies]
    facts["fids"] = [r["fid"] for r in replies]
    facts["features"] = layer.featureCount() if layer else 0
    facts["editable"] = bool(layer and layer.isEditable())
    facts["crs"] = layer.crs().authid() if layer else None
    facts["contains_click"] = [bool(layer and r["fid"] is not None
                                    and contains(layer, r["fid"], utm(*ship), sar.crs(), 2))
                               for r, ship in zip(replies, SHIPS)]
    facts["attributes"] = [layer.getFeature(r["fid"]).attributes() for r in replies if layer and r["fid"] is not None]
    facts["areas"] = [layer.getFeature(r["fid"]).geometry().area() for r in replies if layer and r["fid"] is not None]
    # again on the first ship: the window's embedding may be cached by the engine
    again = click(utm(*SHIPS[0]))
    facts["latency_again"], facts["embedded_again"] = again["seconds"], again["reply"].get("embedded")
    layer.undoStack().undo()
    facts["after_undo"] = layer.featureCount()
    layer.undoStack().undo()
    facts["after_two_undos"] = layer.featureCount()
    # a box around the first ship
    col, row = SHIPS[0]
    box = click(utm(col - 15, row - 15), utm(col + 15, row + 15))
    facts["box"] = {"fid": box["fid"], "seconds": box["seconds"], "class_name": box["reply"].get("class_name"),
                    "contains": box["fid"] is not None and contains(layer, box["fid"], utm(*SHIPS[0]), sar.crs(), 2)}
    # a web (XYZ) layer with nwpu10 (a new engine process): one tile rendered at its GSD around the click
    dock.select_model("nwpu10")
    web = local_xyz_layer(WORK)
    dock.set_checked_rasters([web.id()])
    canvas.setDestinationCrs(web.crs())
    canvas.setExtent(spacenet_middle(web.crs()))
    canvas.refresh()
    t0 = time.perf_counter()
    tool.client.wait_ready(TIMEOUT)
    facts["web_load_seconds"] = time.perf_counter() - t0
    web_reply = click(canvas.extent().center())
    facts["web"] = {"event": web_reply["reply"]["event"], "message": web_reply["reply"].get("message"),
                    "seconds": web_reply["seconds"], "render_seconds": web_reply["render_seconds"],
                    "found": web_reply["fid"] is not None, "class_name": web_reply["reply"].get("class_name"),
                    "model": tool.client.model,
                    "renders_left": [f for f in os.listdir(dock.temp_dir()) if f.startswith("outline_")]}
    facts["bar_messages"] = iface.messages
elif SCENARIO == "fake":
    tool.command = EngineCommand("/usr/bin/python3", (FAKE,))
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))  # not the raster's CRS: reprojected
    canvas.setExtent(QgsCoordinateTransform(sar.crs(), canvas.mapSettings().destinationCrs(),
                                            QgsProject.instance()).transformBoundingBox(sar.extent()))
    canvas.refresh()
    facts["load_seconds"] = switch_on()
    first_pid = tool.client.pid()
    points = [utm(200, 100), utm(300, 200)]
    replies = [click(to_canvas(p, sar.crs())) for p in points]
    layer = outlines()
    facts["latencies"] = [r["seconds"] for r in replies]
    facts["features"] = layer.featureCount()
    facts["editable"] = layer.isEditable()
    facts["crs"] = layer.crs().authid()
    facts["fields"] = layer.fields().names()
    facts["contains_click"] = [contains(layer, r["fid"], p, sar.crs()) for r, p in zip(replies, points)]
    facts["prompt_ids"] = sorted(f["prompt_id"] for f in layer.getFeatures())
    facts["sent_crs_pixel"] = [r["reply"]["pixel"] for r in replies]
    layer.undoStack().undo()
    facts["after_undo"] = layer.featureCount()
    # the blocking path (ServeClient.request): a reply, and an error reply raised as ServeError
    from qgis_plugin.serve_client import ServeError

    facts["sync_embed"] = tool.client.request({"op": "embed", "raster": sar.source(), "point": [UL[0] + 50, UL[1] - 50],
                                               "crs": None}, timeout_s=30)["event"]
    try:
        tool.client.request({"op": "prompt", "raster": "/nonexistent.tif", "point": [0, 0]}, timeout_s=30)
    except ServeError as exc:
        facts["sync_error"] = str(exc)
    box = click(to_canvas(utm(250, 150), sar.crs()), to_canvas(utm(290, 190), sar.crs()))
    facts["box_area"] = layer.getFeature(box["fid"]).geometry().area() if box["fid"] is not None else None
    facts["after_box"] = layer.featureCount()
    n_messages = len(iface.messages)
    nothing = click(to_canvas(utm(20, 100), sar.crs()))  # left tenth: the fake finds nothing there
    facts["nothing"] = {"fid": nothing["fid"], "wkt": nothing["reply"].get("wkt"), "features": layer.featureCount(),
                        "messages": [m for m, _ in iface.messages[n_messages:]]}
    n_messages = len(iface.messages)
    outside = click(to_canvas(utm(-300, 100), sar.crs()))
    facts["outside"] = {"event": outside["reply"]["event"], "features": layer.featureCount(),
                        "messages": [m for m, _ in iface.messages[n_messages:]]}
    # a web layer: one tile rendered around the click, sent with the RGB(A) bands
    web = local_xyz_layer(WORK)
    dock.set_checked_rasters([web.id()])
    canvas.setDestinationCrs(web.crs())
    mid = QgsCoordinateTransform(sar.crs(), web.crs(), QgsProject.instance()).transformBoundingBox(
        QgsRasterLayer(str(ROOT / "examples" / "spacenet_atlanta.tif")).extent())
    canvas.setExtent(mid.buffered(-100))
    canvas.refresh()
    web_reply = click(mid.center())
    facts["web"] = {"fid": web_reply["fid"], "raster_size": web_reply["reply"].get("raster_size"),
                    "bands": web_reply["reply"].get("bands"), "render_seconds": web_reply["render_seconds"],
                    "model_tile": tab.selected_model().tile_size, "model_bands": tab.selected_model().bands,
                    "features": layer.featureCount(),
                    "renders_left": [f for f in os.listdir(dock.temp_dir()) if f.startswith("outline_")]}
    # a raster without georeferencing: a new outline layer without CRS, prompts in the pixel frame
    QgsProject.instance().removeMapLayer(layer.id())
    jpg = QgsRasterLayer(str(ROOT / "examples" / "nwpu_021.jpg"), "nwpu")
    QgsProject.instance().addMapLayer(jpg)
    dock.set_checked_rasters([jpg.id()])
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem())
    canvas.setExtent(jpg.extent())
    canvas.refresh()
    pixel = click(QgsPointXY(700, -400))
    layer = outlines()
    facts["pixel_frame"] = {"fid": pixel["fid"], "crs_valid": layer.crs().isValid(), "pixel": pixel["reply"]["pixel"],
                            "contains": layer.getFeature(pixel["fid"]).geometry().contains(
                                QgsGeometry.fromPointXY(QgsPointXY(700, -400)))}
    dock.set_checked_rasters([web.id()])
    canvas.setDestinationCrs(web.crs())
    canvas.setExtent(mid.buffered(-100))
    canvas.refresh()
    # the engine killed: reported, and the next click starts a new process
    os.kill(first_pid, signal.SIGKILL)
    assert wait_until(lambda: tool.client is None, 30), "the dead engine was not noticed"
    facts["killed_messages"] = [m for m, _ in iface.messages if "stopped unexpectedly" in m]
    again = click(mid.center())
    facts["after_kill"] = {"fid": again["fid"], "pid_changed": tool.client.pid() not in (0, first_pid)}
    # a model change ends the process serving the old model
    second_pid = tool.client.pid()
    dock.select_model("nwpu10")
    facts["after_model_change"] = {"client": tool.client is not None and tool.client.model,
                                   "old_alive": os.path.exists(f"/proc/{second_pid}")
                                   and second_pid in child_processes()}
    # switched off by another map tool: the button follows
    from qgis.gui import QgsMapToolPan

    pan = QgsMapToolPan(canvas)
    canvas.setMapTool(pan)
    facts["button_after_pan"] = tab.outline_button.isChecked()
    facts["features_final"] = layer.featureCount()  # the pixel frame's outline layer: 1 + the click after the kill
    facts["bar_messages"] = iface.messages
else:
    raise SystemExit(f"unknown scenario {SCENARIO}")

facts["children_before_unload"] = len(child_processes())
plugin.unload()
flush_deletes()
facts["children_left"] = child_processes()
facts["processes_left"] = len(iface.window.findChildren(QProcess))
facts["tool_left"] = canvas.mapTool() is not None and type(canvas.mapTool()).__name__ == "OutlineTool"
report(facts)
