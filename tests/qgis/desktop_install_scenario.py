"""Runs inside the real QGIS desktop (``qgis --code desktop_install_scenario.py``, under Xvfb, started by
``desktop_run.py --install-from WHEELS``), the plugin installed from its zip into a throw-away profile with no engine
set: opens the dock's Settings tab, clicks Install engine with WHEELS as the wheel folder, waits for the install
and the Check engine that follows it, saves a screenshot of the dock and a JSON file of facts, then quits.

Environment: DELINEATE_WHEELS (wheel folder), DELINEATE_SCREENSHOT (PNG path), DELINEATE_FACTS (JSON path).
"""

import json
import os
import sys
import time

import qgis.utils
from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt, QTimer

WHEELS = os.environ["DELINEATE_WHEELS"]
PNG = os.environ["DELINEATE_SCREENSHOT"]
FACTS = os.environ["DELINEATE_FACTS"]
facts: dict = {"plugins": sorted(qgis.utils.plugins), "sys_executable": sys.executable,
               "sys_base_executable": getattr(sys, "_base_executable", None), "sys_exec_prefix": sys.exec_prefix}
state: dict = {"t0": time.monotonic()}


def finish() -> None:
    with open(FACTS, "w", encoding="utf-8") as f:
        json.dump(facts, f)
    QgsApplication.exit(0)


def poll(condition, then, timeout: float = 480) -> None:
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
    window = qgis.utils.iface.mainWindow()
    window.resize(1500, 940)
    window.move(0, 0)
    plugin = qgis.utils.plugins["delineate"]
    facts["qgis_python"] = sys.modules["delineate.settings"].qgis_python()
    dock = plugin.show_dock()
    window.resizeDocks([dock], [470], Qt.Horizontal)
    dock.tabs.setCurrentIndex(2)
    tab = dock.settings_tab
    state.update(dock=dock, tab=tab, results=[])
    facts["status_before"] = tab.engine_status.text()
    tab.wheel_folder_widget.setFilePath(WHEELS)
    tab.install_button.click()
    if tab.installer is not None:
        tab.installer.installFinished.connect(state["results"].append)
    poll(lambda: bool(state["results"]) and not state["dock"].is_busy()
         and tab.engine_status.text() not in ("checking...", "not checked"), installed)


def installed() -> None:
    result, tab = state["results"][-1], state["tab"]
    facts.update(ok=result.ok, message=result.message, python=result.python, status=tab.engine_status.text(),
                 status_style=tab.engine_status.styleSheet(), install_status=tab.install_status.text())
    QTimer.singleShot(1500, shoot)


def shoot() -> None:
    dock = state["dock"]
    for view in (dock.log_view, state["tab"].doctor_view):  # their last lines: the install's end, the runtimes
        view.verticalScrollBar().setValue(view.verticalScrollBar().maximum())
    facts["size"] = [dock.width(), dock.height()]
    facts["saved"] = dock.grab().save(PNG, "PNG")
    facts["seconds"] = round(time.monotonic() - state["t0"], 1)
    finish()


QTimer.singleShot(3000, begin)
