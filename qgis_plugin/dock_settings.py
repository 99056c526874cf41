"""The dock's Settings tab: the engine's Python, the command it gives, and "Check engine" (``rs-engine doctor``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgis.core import Qgis
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QFormLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from . import settings
from .engine import EngineJob, EngineResult

if TYPE_CHECKING:
    from .dock import DelineateDock


class SettingsTab(QWidget):
    """Where the engine is; ``job``: a running ``rs-engine doctor``."""

    def __init__(self, dock: DelineateDock) -> None:
        super().__init__(dock)
        self.dock = dock
        self.job: EngineJob | None = None
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.python_widget = QgsFileWidget(self)
        self.python_widget.setStorageMode(QgsFileWidget.GetFile)
        self.python_widget.setFilePath(settings.engine_python())
        self.python_widget.lineEdit().setPlaceholderText("automatic (repository .venv, else rs-engine on PATH)")
        self.python_widget.fileChanged.connect(self._on_python_changed)
        form.addRow("Engine Python", self.python_widget)
        layout.addLayout(form)
        self.command_label = QLabel("", self)
        self.command_label.setWordWrap(True)
        self.command_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.command_label)
        self.check_button = QPushButton("Check engine", self)
        self.check_button.clicked.connect(self.check_engine)
        layout.addWidget(self.check_button)
        self.doctor_view = QPlainTextEdit(self)
        self.doctor_view.setReadOnly(True)
        self.doctor_view.setPlaceholderText("rs-engine doctor output")
        layout.addWidget(self.doctor_view, 1)
        self._show_command()

    # -- state ---------------------------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.check_button.setEnabled(not running)

    def is_busy(self) -> bool:
        return self.job is not None and self.job.is_running()

    def cancel(self) -> None:
        """The doctor is short: it is not cancelled, only ended at shutdown."""

    def shutdown(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            job.shutdown()

    # -- engine --------------------------------------------------------------------------------------------
    def check_engine(self) -> None:
        """Run ``rs-engine doctor`` and show its report."""
        if self.dock.is_busy():
            return
        self.doctor_view.setPlainText("running rs-engine doctor...")
        self.job = EngineJob("rs-engine", ["doctor"], parent=self, jsonl=False)
        self.job.jobFinished.connect(self._on_doctor)
        self.dock.set_running(True)
        self.job.start()

    def _on_doctor(self, result: EngineResult) -> None:
        if self.job is not None:
            self.job.deleteLater()
            self.job = None
        self.dock.set_running(False)
        if result.ok:
            self.doctor_view.setPlainText(result.stdout)
            self.dock.notify("engine OK", Qgis.Success, 3)
        else:
            self.doctor_view.setPlainText(result.message)
            self.dock.notify(f"engine check failed: {result.message}", Qgis.Critical)

    def _on_python_changed(self, path: str) -> None:
        settings.set_engine_python(path)
        self._show_command()
        self.dock.catalog.refresh()

    def _show_command(self) -> None:
        try:
            command = settings.engine_command("rs-engine")
            self.command_label.setText("engine command: " + " ".join(command.argv([])))
        except settings.EngineNotFound as exc:
            self.command_label.setText(str(exc))
