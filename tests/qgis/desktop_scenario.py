"""Runs inside the real QGIS desktop (``qgis --code desktop_scenario.py``, under Xvfb), with the plugin installed
from its zip into a throw-away profile (see qgis_profile.py): opens the Delineate dock, segments a raster with it,
shows the result over the raster, saves a screenshot of the main window and a JSON file of facts, then quits.

Environment: DELINEATE_RASTER (input), DELINEATE_MODEL (default ssdd-ship), DELINEATE_SCREENSHOT (PNG path),
DELINEATE_FACTS (JSON path).
"""

import json
import os
import time

import qgis.utils
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import Qt, QTimer

RASTER = os.environ["DELINEATE_RASTER"]
MODEL = os.environ.get("DELINEATE_MODEL", "ssdd-ship")
PNG = os.environ["DELINEATE_SCREENSHOT"]
FACTS = os.environ["DELINEATE_FACTS"]
facts: dict = {"plugins": sorted(qgis.utils.plugins)}
state: dict = {"t0": time.monotonic()}


def finish() -> None:
    with open(FACTS, "w", encoding="utf-8") as f:
        json.dump(facts, f)
    QgsApplication.exit(0)


def poll(condition, then, timeout: float = 240) -> None:
    """Call ``then`` once ``condition()`` holds (checked every 200 ms), else give up and quit."""
    start = time.monotonic()

    def tick() -> None:
        if condition():
            then()
        elif time.monotonic() - start > timeout:
            facts["timeout"] = then.__name__
            finish()
        else:
            QTimer.singleShot(200, tick)

    QTimer.singleShot(200, tick)


def begin() -> None:
    iface = qgis.utils.iface
    window = iface.mainWindow()
    window.resize(1500, 940)
    window.move(0, 0)
    layer = QgsRasterLayer(RASTER, os.path.splitext(os.path.basename(RASTER))[0])
    QgsProject.instance().addMapLayer(layer)
    iface.mapCanvas().setDestinationCrs(layer.crs())
    iface.mapCanvas().setExtent(layer.extent())
    plugin = qgis.utils.plugins["delineate"]
    dock = plugin.show_dock()
    window.resizeDocks([dock], [440], Qt.Horizontal)
    state.update(dock=dock, layer=layer, results=[])
    dock.runFinished.connect(state["results"].append)
    poll(lambda: bool(dock.catalog.models), models_ready, 120)


def models_ready() -> None:
    dock = state["dock"]
    dock.select_model(MODEL)
    dock.set_checked_rasters([state["layer"].id()])
    dock.segment_tab.segment_button.click()
    poll(lambda: bool(state["results"]), segmented)


def segmented() -> None:
    result = state["results"][-1]
    facts["ok"], facts["message"] = result.ok, result.message
    facts["layers"] = [(lyr.name(), lyr.featureCount(), lyr.crs().authid())
                       for lyr in QgsProject.instance().mapLayers().values() if isinstance(lyr, QgsVectorLayer)]
    qgis.utils.iface.mapCanvas().refreshAllLayers()
    QTimer.singleShot(4000, shoot)  # let the canvas render


def shoot() -> None:
    window = qgis.utils.iface.mainWindow()
    facts["window"] = [window.width(), window.height()]
    facts["saved"] = window.grab().save(PNG, "PNG")
    facts["seconds"] = round(time.monotonic() - state["t0"], 1)
    finish()


QTimer.singleShot(3000, begin)
