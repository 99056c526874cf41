"""A real QGIS application for the plugin's scenario scripts (run under Debian's /usr/bin/python3, offscreen,
each in its own process started by tests/qgis/test_*.py): a throw-away profile, a main window with a real map
canvas and message bar, and a small ``iface`` with the calls the plugin makes."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["GDAL_PAM_ENABLED"] = "NO"  # QGIS must not write .aux.xml statistics beside the example rasters

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.append("/usr/share/qgis/python/plugins")  # Processing

from qgis.core import QgsApplication, QgsProject  # noqa: E402
from qgis.gui import QgsMapCanvas, QgsMessageBar  # noqa: E402
from qgis.PyQt.QtCore import QCoreApplication, QEvent, QSettings, Qt  # noqa: E402
from qgis.PyQt.QtWidgets import QMainWindow, QMenu, QToolBar, QVBoxLayout, QWidget  # noqa: E402

PROFILE = tempfile.mkdtemp(prefix="delineate-qgis-profile-")
# settings (QgsSettings: user models, engine Python) go to the throw-away profile, never to the user's own
QSettings.setDefaultFormat(QSettings.IniFormat)
QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, PROFILE)
QCoreApplication.setOrganizationName("DelineateTests")
QCoreApplication.setApplicationName("delineate-test")
APP = QgsApplication([b"delineate-test"], True, PROFILE)
APP.setPrefixPath("/usr", True)
APP.initQgis()
atexit.register(shutil.rmtree, PROFILE, ignore_errors=True)


class FakeIface:
    """The part of QgisInterface the plugin uses, backed by real widgets; counts menu / toolbar calls."""

    def __init__(self) -> None:
        self.window = QMainWindow()
        self.window.setObjectName("DelineateTestWindow")
        central = QWidget(self.window)
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = QgsMessageBar(central)
        layout.addWidget(self.bar)
        self.canvas = QgsMapCanvas(central)
        self.canvas.setCanvasColor(Qt.white)
        layout.addWidget(self.canvas, 1)
        self.window.setCentralWidget(central)
        self.menu = QMenu("Raster", self.window)
        self.window.menuBar().addMenu(self.menu)
        self.toolbar = QToolBar("Raster", self.window)
        self.window.addToolBar(self.toolbar)
        self.calls: dict[str, int] = {}
        self.messages: list[tuple[str, int]] = []
        self.bar.widgetAdded.connect(self._on_message)

    def _on_message(self, _widget: Any) -> None:
        item = self.bar.currentItem()
        if item is not None:
            self.messages.append((item.text(), int(item.level())))

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def mainWindow(self) -> QMainWindow:  # noqa: N802
        return self.window

    def mapCanvas(self) -> QgsMapCanvas:  # noqa: N802
        return self.canvas

    def messageBar(self) -> QgsMessageBar:  # noqa: N802
        return self.bar

    def activeLayer(self) -> Any:  # noqa: N802
        return None

    def addDockWidget(self, area: Any, dock: Any) -> None:  # noqa: N802
        self._count("addDockWidget")
        self.window.addDockWidget(area, dock)

    def removeDockWidget(self, dock: Any) -> None:  # noqa: N802
        self._count("removeDockWidget")
        self.window.removeDockWidget(dock)

    def addPluginToRasterMenu(self, name: str, action: Any) -> None:  # noqa: N802
        self._count("addPluginToRasterMenu")
        self.menu.addAction(action)

    def removePluginRasterMenu(self, name: str, action: Any) -> None:  # noqa: N802
        self._count("removePluginRasterMenu")
        self.menu.removeAction(action)

    def addRasterToolBarIcon(self, action: Any) -> None:  # noqa: N802
        self._count("addRasterToolBarIcon")
        self.toolbar.addAction(action)

    def removeRasterToolBarIcon(self, action: Any) -> None:  # noqa: N802
        self._count("removeRasterToolBarIcon")
        self.toolbar.removeAction(action)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Run the Qt event loop until ``predicate()`` or ``timeout`` seconds; True when it came true."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            return False
        QgsApplication.processEvents()
        time.sleep(0.02)
    return True


def flush_deletes() -> None:
    """Process pending deleteLater() calls."""
    for _ in range(3):
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        QgsApplication.processEvents()


def install_plugin_zip(zip_path: str) -> str:
    """Unpack the plugin zip into this profile's ``python/plugins`` as "Install from ZIP" does and make it
    importable; returns its package name (``delineate``) for :func:`load_plugin`."""
    import zipfile

    plugins = os.path.join(PROFILE, "python", "plugins")
    os.makedirs(plugins, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins)
        (top,) = {name.split("/", 1)[0] for name in zf.namelist()}
    sys.path.insert(0, plugins)
    return top


def load_plugin(iface: FakeIface, package: str = "qgis_plugin") -> Any:
    """classFactory + initProcessing + initGui, as QGIS does (``package``: the repository's ``qgis_plugin``, or
    the name :func:`install_plugin_zip` gave)."""
    import importlib

    import qgis.utils

    module = importlib.import_module(package)
    qgis.utils.iface = iface
    plugin = module.classFactory(iface)
    plugin.initProcessing()
    plugin.initGui()
    return plugin


def init_processing() -> None:
    """Start QGIS's Processing framework (native + Python algorithms)."""
    from processing.core.Processing import Processing

    Processing.initialize()


def engine_modules_loaded() -> list[str]:
    """Heavy engine modules imported into this (QGIS's) process: must stay empty."""
    return sorted(m for m in ("torch", "rasterio", "rs_engine", "training", "numpy.torch") if m in sys.modules)


def report(facts: dict[str, Any]) -> None:
    """The scenario's result: one JSON line, last on stdout."""
    facts.setdefault("engine_modules_loaded", engine_modules_loaded())
    sys.stdout.write(json.dumps(facts, default=str) + "\n")
    sys.stdout.flush()


def child_processes() -> list[int]:
    """Process ids whose parent is this process (engine processes still running)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                children.append(int(entry))
    return children


def project() -> QgsProject:
    return QgsProject.instance()


def sar_example_in_utm(workdir: str) -> str:
    """examples/ssdd_001111.jpg (SAR, 491 x 321 px, 24 annotated ships) as a 1-band GeoTIFF in UTM 16N
    (EPSG:32616) at 1 m, upper-left corner at (733601, 3725139); returns its path under ``workdir``."""
    from osgeo import gdal

    path = os.path.join(workdir, "ssdd_utm.tif")
    gdal.Translate(path, str(ROOT / "examples" / "ssdd_001111.jpg"), format="GTiff", bandList=[1],
                   outputSRS="EPSG:32616", outputBounds=[733601, 3725139, 733601 + 491, 3725139 - 321])
    return path


def local_xyz_layer(workdir: str, name: str = "local xyz") -> Any:
    """A web (XYZ) layer over local tiles: examples/spacenet_atlanta.tif scaled to 8 bits and cut by gdal2tiles
    (zoom 17-18), read through QGIS's wms provider like any XYZ service; added to the project, returned."""
    from qgis.core import QgsRasterLayer

    tiles = os.path.join(workdir, "xyz")
    vrt = os.path.join(workdir, "atlanta8.vrt")
    subprocess.run(["gdal_translate", "-q", "-of", "VRT", "-ot", "Byte", "-scale", "59", "1500", "0", "255",
                    str(ROOT / "examples" / "spacenet_atlanta.tif"), vrt], check=True)
    subprocess.run([shutil.which("gdal2tiles.py") or "gdal2tiles", "--xyz", "-z", "17-18", "-w", "none",
                    "--processes=1", "-q", vrt, tiles], check=True)
    url = f"type=xyz&url=file://{tiles}/{{z}}/{{x}}/{{y}}.png&zmin=17&zmax=18"
    layer = QgsRasterLayer(url, name, "wms")
    QgsProject.instance().addMapLayer(layer)
    return layer


def spacenet_middle(crs: Any) -> Any:
    """The middle 200 m x 200 m of examples/spacenet_atlanta.tif as a QgsRectangle in ``crs``."""
    from qgis.core import QgsRasterLayer

    from qgis_plugin.layers import transform_extent

    source = QgsRasterLayer(str(ROOT / "examples" / "spacenet_atlanta.tif"), "atlanta")
    return transform_extent(source.extent().buffered(-125), source.crs(), crs)
