"""``python3 plugin_smoke.py WORKDIR``, run by tests/qgis/test_plugin.py under Debian's /usr/bin/python3 (QGIS's own
Python), never inside the engine's process: PyQGIS and rasterio's GDAL must not meet in one process. Loads the
plugin in real QGIS (offscreen), opens its dock (which asks the engine for its models), starts a segmentation,
unloads the plugin while it runs and prints one JSON line of facts."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, FakeIface, child_processes, flush_deletes, load_plugin, report, wait_until  # noqa: E402
from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer  # noqa: E402
from qgis.PyQt.QtCore import QProcess  # noqa: E402
from qgis.PyQt.QtWidgets import QAction, QDockWidget  # noqa: E402

iface = FakeIface()
plugin = load_plugin(iface)
registry = QgsApplication.processingRegistry()
provider_loaded = registry.providerById("delineate") is not None
algorithms = sorted(a.id() for a in registry.algorithms() if a.provider() and a.provider().id() == "delineate")
actions = len(plugin.actions)
menu_entries = len(iface.menu.actions())
dock = plugin.show_dock()
models_listed = wait_until(lambda: bool(dock.catalog.models), 120)
models = [m.key for m in dock.catalog.models]
dock_visible = dock.isVisible() or not dock.isHidden()
# Settings tab: "Check engine" runs rs-engine doctor; a wrong engine Python is reported, then fixed
dock.check_engine()
wait_until(lambda: not dock.is_busy(), 120)
doctor_text = dock.settings_tab.doctor_view.toPlainText()
dock.settings_tab.python_widget.setFilePath("/nonexistent/python")
dock.check_engine()
wait_until(lambda: not dock.is_busy(), 30)
bad_engine_text = dock.settings_tab.doctor_view.toPlainText()
dock.settings_tab.python_widget.setFilePath("")  # back to the automatic choice (the repository's .venv)
wait_until(lambda: not dock.catalog.busy(), 60)

# unload while a segmentation and a model listing run: both processes must end, nothing be left behind
# The NWPU example with nwpu10 (6 tiles): seconds of work even on a fast machine, so the unload lands mid-run. The
# one-tile SAR example could finish between the click and the unload on a loaded machine, its output then rightly kept.
raster = QgsRasterLayer(str(ROOT / "examples" / "nwpu_021.jpg"), "nwpu")
QgsProject.instance().addMapLayer(raster)
dock.select_model("nwpu10")
dock.set_checked_rasters([raster.id()])
output = os.path.join(sys.argv[1], "unload.gpkg")
dock.segment_tab.output_widget.setFilePath(output)
dock.segment_tab.segment_button.click()
wait_until(lambda: dock.job is not None and dock.job.pid > 0, 30)
dock.catalog.refresh()
running_at_unload = dock.catalog.busy() and dock.is_busy()
children_before = len(child_processes())
plugin.unload()
flush_deletes()
report({
    "qgis": Qgis.QGIS_VERSION,
    "added": iface.calls.get("addPluginToRasterMenu", 0),
    "actions": actions,
    "menu_entries": menu_entries,
    "removed": iface.calls.get("removePluginRasterMenu", 0),
    "toolbar_added": iface.calls.get("addRasterToolBarIcon", 0),
    "toolbar_removed": iface.calls.get("removeRasterToolBarIcon", 0),
    "left": len(plugin.actions),
    "provider_loaded": provider_loaded,
    "algorithms": algorithms,
    "provider_left": registry.providerById("delineate") is not None,
    "models_listed": models_listed,
    "models": models,
    "dock_visible": dock_visible,
    "running_at_unload": running_at_unload,
    "docks_left": len(iface.window.findChildren(QDockWidget)),
    "processes_left": len(iface.window.findChildren(QProcess)),
    "actions_left": len([a for a in iface.window.findChildren(QAction) if a.text() in ("Delineate", "Check engine")]),
    "menu_left": len(iface.menu.actions()),
    "children_before_unload": children_before,
    "doctor": doctor_text,
    "bad_engine": bad_engine_text,
    "children_left": child_processes(),
    "unload_output_left": sorted(f for f in os.listdir(sys.argv[1]) if "unload" in f),
})
