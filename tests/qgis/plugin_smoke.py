"""Run by tests/qgis/test_plugin.py under Debian's /usr/bin/python3 (QGIS's own Python), never inside the engine's
process: PyQGIS and rasterio's GDAL must not meet in one process. Prints one JSON line of facts."""

import json
import os
import sys
from unittest import mock

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import Qgis  # noqa: E402
from qgis.PyQt.QtWidgets import QMainWindow  # noqa: E402
from qgis.testing import start_app  # noqa: E402

app = start_app()
sys.path.insert(0, sys.argv[1])
import qgis_plugin  # noqa: E402

window = QMainWindow()
iface = mock.MagicMock()
iface.mainWindow.return_value = window
plugin = qgis_plugin.classFactory(iface)
plugin.initGui()
added = iface.addPluginToRasterMenu.call_count
actions = len(plugin.actions)
plugin.unload()
print(json.dumps({
    "qgis": Qgis.QGIS_VERSION,
    "added": added,
    "actions": actions,
    "removed": iface.removePluginRasterMenu.call_count,
    "left": len(plugin.actions),
    "engine_modules_loaded": sorted(m for m in ("torch", "rasterio", "rs_engine") if m in sys.modules),
}))
