"""The Delineate dock: the Segment, Retrain and Settings tabs (:mod:`.dock_segment`, :mod:`.dock_retrain`,
:mod:`.dock_settings`) over a shared progress bar, log, model catalog and temporary folder.

One thing runs at a time (a segment queue, a training or an engine check); every engine run is an
:class:`~.engine.EngineJob` in its own process, so QGIS never waits on it.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from qgis.core import Qgis, QgsProject
from qgis.gui import QgsDockWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QPlainTextEdit, QProgressBar, QTabWidget, QVBoxLayout, QWidget

from . import settings
from .dock_retrain import RetrainTab
from .dock_segment import SegmentTab
from .dock_settings import SettingsTab
from .engine import EngineJob, log
from .models import ModelCatalog, ModelInfo

SEGMENT_TAB, RETRAIN_TAB, SETTINGS_TAB = range(3)


class DelineateDock(QgsDockWidget):
    """The plugin's panel. Signals for callers and tests: ``runFinished(EngineResult)`` after the last raster of
    a Segment click (or the first failure), ``trainFinished(EngineResult)`` after a Retrain run."""

    runFinished = pyqtSignal(object)
    trainFinished = pyqtSignal(object)

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__("Delineate", parent)
        self.setObjectName("DelineateDock")
        self.iface = iface
        self._tmpdir: str | None = None
        self.catalog = ModelCatalog(self)
        self.catalog.failed.connect(lambda msg: self.notify(f"could not list models: {msg}", Qgis.Warning))

        body = QWidget(self)
        layout = QVBoxLayout(body)
        self.tabs = QTabWidget(body)
        self.progress = QProgressBar(body)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.log_view = QPlainTextEdit(body)
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(2000)
        self.log_view.setPlaceholderText("engine log")
        self.segment_tab = SegmentTab(self)
        self.retrain_tab = RetrainTab(self)
        self.settings_tab = SettingsTab(self)
        self.tabs.addTab(self.segment_tab, "Segment")
        self.tabs.addTab(self.retrain_tab, "Retrain")
        self.tabs.addTab(self.settings_tab, "Settings")
        layout.addWidget(self.tabs)
        layout.addWidget(self.progress)
        layout.addWidget(self.log_view, 1)
        self.setWidget(body)

        project = QgsProject.instance()
        project.layersAdded.connect(self._refresh_raster_lists)
        project.layersRemoved.connect(self._refresh_raster_lists)
        self._refresh_raster_lists()
        self.set_running(False)
        self.catalog.refresh()

    def _tab_list(self) -> tuple[SegmentTab, RetrainTab, SettingsTab]:
        return self.segment_tab, self.retrain_tab, self.settings_tab

    # -- shared by the tabs --------------------------------------------------------------------------------
    def notify(self, text: str, level: Qgis.MessageLevel = Qgis.Info, duration: int = 8) -> None:
        """Message bar + dock log + QGIS message log."""
        self.append_log(text)
        log(text, level)
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is not None:
            bar.pushMessage("Delineate", text, level, 0 if level == Qgis.Critical else duration)

    def append_log(self, text: str) -> None:
        """One line in the dock's log (with the time)."""
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def temp_dir(self) -> str:
        """The dock's temporary folder (temporary outputs, rendered rasters, exported labels)."""
        if self._tmpdir is None or not os.path.isdir(self._tmpdir):
            self._tmpdir = tempfile.mkdtemp(prefix="delineate_")
        return self._tmpdir

    def set_running(self, running: bool) -> None:
        """Enable the start buttons when idle, the Cancel buttons while something runs."""
        for tab in self._tab_list():
            tab.set_running(running)

    def is_busy(self) -> bool:
        """True while a segment queue, a training or an engine check runs."""
        return any(tab.is_busy() for tab in self._tab_list())

    @property
    def job(self) -> EngineJob | None:
        """The engine process running now (a segment run's, a training's or the engine check's), if any."""
        return self.segment_tab.queue.job or self.retrain_tab.job or self.settings_tab.job

    def cancel(self) -> None:
        """Cancel what runs: the engine process (SIGTERM, then kill) or the render task; nothing is added."""
        for tab in self._tab_list():
            tab.cancel()

    def register_model(self, path: str) -> None:
        """Remember a model file, refresh the list from the engine and select it in the Segment tab."""
        settings.add_user_model(path)
        self.segment_tab.select_after_refresh = os.path.abspath(path)
        self.catalog.refresh()

    def _refresh_raster_lists(self, *_args: Any) -> None:
        self.segment_tab.raster_list.refresh()
        self.retrain_tab.raster_list.refresh()
        self.segment_tab.prefill_bands()

    # -- for the plugin and scripts ------------------------------------------------------------------------
    def selected_model(self) -> ModelInfo | None:
        """The model chosen in the Segment tab."""
        return self.segment_tab.selected_model()

    def select_model(self, key: str) -> None:
        """Choose a model by key (bundled name or path) in the Segment tab."""
        self.segment_tab.select_model(key)

    def set_checked_rasters(self, layer_ids: list[str], train: bool = False) -> None:
        """Check exactly these raster layers in the Segment (or Retrain) list."""
        (self.retrain_tab if train else self.segment_tab).raster_list.set_checked(layer_ids)

    def check_engine(self) -> None:
        """Show the Settings tab and run ``rs-engine doctor`` there."""
        self.tabs.setCurrentIndex(SETTINGS_TAB)
        self.settings_tab.check_engine()

    def shutdown(self) -> None:
        """End every process and task this dock started and disconnect from the project (plugin unload)."""
        project = QgsProject.instance()
        for signal in (project.layersAdded, project.layersRemoved):
            try:
                signal.disconnect(self._refresh_raster_lists)
            except TypeError:
                pass
        for tab in self._tab_list():
            tab.shutdown()
        self.catalog.shutdown()
