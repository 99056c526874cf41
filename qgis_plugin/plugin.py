"""Plugin entry: the Delineate dock (menu + toolbar action), a "Check engine" action and the Processing
provider. ``unload`` removes all of it and ends every process the plugin started."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .settings import plugin_dir


class DelineatePlugin:
    """QGIS plugin object: ``initProcessing`` / ``initGui`` add, ``unload`` removes everything they added."""

    MENU = "&Delineate"

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.actions: list[QAction] = []
        self.toolbar_actions: list[QAction] = []
        self.dock = None
        self.provider = None

    def initProcessing(self) -> None:  # noqa: N802 (QGIS's name)
        """Register the ``delineate`` Processing provider (called by QGIS before initGui, and by qgis_process)."""
        if self.provider is None:
            from .processing_provider import DelineateProvider

            self.provider = DelineateProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 (QGIS's name)
        """Add the dock (hidden until asked for), its menu / toolbar action and the "Check engine" action."""
        self.initProcessing()
        icon = QIcon(str(plugin_dir() / "icon.svg"))
        window = self.iface.mainWindow()
        show = QAction(icon, "Delineate", window)
        show.setCheckable(True)
        show.setToolTip("Show the Delineate panel (segment rasters, retrain models)")
        show.toggled.connect(self._toggle_dock)
        self.iface.addPluginToRasterMenu(self.MENU, show)
        self.iface.addRasterToolBarIcon(show)
        self.toolbar_actions.append(show)
        self.actions.append(show)
        check = QAction("Check engine", window)
        check.triggered.connect(self.check_engine)
        self.iface.addPluginToRasterMenu(self.MENU, check)
        self.actions.append(check)

    def _ensure_dock(self) -> Any:
        if self.dock is None:
            from .dock import DelineateDock

            self.dock = DelineateDock(self.iface, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.dock.visibilityChanged.connect(self._sync_action)
        return self.dock

    def _toggle_dock(self, visible: bool) -> None:
        if visible:
            self._ensure_dock().show()
            self.dock.raise_()
        elif self.dock is not None:
            self.dock.hide()

    def _sync_action(self, visible: bool) -> None:
        if self.actions:
            self.actions[0].blockSignals(True)
            self.actions[0].setChecked(visible)
            self.actions[0].blockSignals(False)

    def show_dock(self) -> Any:
        """Open the dock and return it."""
        if self.actions:
            self.actions[0].setChecked(True)
        return self._ensure_dock()

    def check_engine(self) -> None:
        """Open the dock's Settings tab and run ``rs-engine doctor`` (in its own process)."""
        self.show_dock().check_engine()

    def unload(self) -> None:
        """Remove the dock, the actions and the provider; end running engine processes."""
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        for action in self.actions:
            self.iface.removePluginRasterMenu(self.MENU, action)
            if action in self.toolbar_actions:
                self.iface.removeRasterToolBarIcon(action)
            action.deleteLater()
        self.actions.clear()
        self.toolbar_actions.clear()
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
