"""The dock's Settings tab: the engine's Python, the command it gives, "Check engine" (``rs-engine doctor``, its
status turns green when the engine runs) and "Install engine" (:mod:`.installer`: an isolated environment in the
QGIS profile, light or full, from the package index or a local wheel folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qgis.core import Qgis
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from . import settings
from .engine import EngineJob, EngineResult
from .installer import EngineInstaller, InstallError, InstallResult, make_plan

if TYPE_CHECKING:
    from .dock import DelineateDock

OK_STYLE, FAILED_STYLE = "color: #1a7f37; font-weight: bold", "color: #b42318; font-weight: bold"
LIGHT, FULL = range(2)


class SettingsTab(QWidget):
    """Where the engine is and how it gets there; ``job``: a running ``rs-engine doctor``, ``installer``: a
    running install. ``engine_status`` says whether the last check passed (green) or failed (red)."""

    def __init__(self, dock: DelineateDock) -> None:
        super().__init__(dock)
        self.dock = dock
        self.job: EngineJob | None = None
        self.installer: EngineInstaller | None = None
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.python_widget = QgsFileWidget(self)
        self.python_widget.setStorageMode(QgsFileWidget.GetFile)
        self.python_widget.setFilePath(settings.engine_python())
        self.python_widget.lineEdit().setPlaceholderText("automatic (repository .venv, installed engine, PATH)")
        self.python_widget.fileChanged.connect(self._on_python_changed)
        form.addRow("Engine Python", self.python_widget)
        layout.addLayout(form)
        self.command_label = QLabel("", self)
        self.command_label.setWordWrap(True)
        self.command_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.command_label)
        row = QHBoxLayout()
        self.check_button = QPushButton("Check engine", self)
        self.check_button.clicked.connect(self.check_engine)
        row.addWidget(self.check_button)
        self.engine_status = QLabel("not checked", self)
        self.engine_status.setWordWrap(True)
        row.addWidget(self.engine_status, 1)
        layout.addLayout(row)
        layout.addWidget(self._install_box())
        self.doctor_view = QPlainTextEdit(self)
        self.doctor_view.setReadOnly(True)
        self.doctor_view.setPlaceholderText("rs-engine doctor output")
        layout.addWidget(self.doctor_view, 1)
        self._show_command()

    def _install_box(self) -> QGroupBox:
        box = QGroupBox("Install engine (into the QGIS profile, isolated from QGIS's Python)", self)
        form = QFormLayout(box)
        self.kind_combo = QComboBox(box)
        self.kind_combo.addItem("light: segment (ONNX Runtime, a few hundred MB)", LIGHT)
        self.kind_combo.addItem("full: adds PyTorch and training, for Retrain (several GB)", FULL)
        form.addRow("Engine", self.kind_combo)
        self.wheel_folder_widget = QgsFileWidget(box)
        self.wheel_folder_widget.setStorageMode(QgsFileWidget.GetDirectory)
        self.wheel_folder_widget.lineEdit().setPlaceholderText("none: dependencies from the package index")
        self.wheel_folder_widget.setToolTip("A folder of wheels to install from, offline (no package index)")
        form.addRow("Wheel folder", self.wheel_folder_widget)
        row = QHBoxLayout()
        self.install_button = QPushButton("Install engine", box)
        self.install_button.clicked.connect(self.install_engine)
        row.addWidget(self.install_button)
        self.cancel_install_button = QPushButton("Cancel", box)
        self.cancel_install_button.clicked.connect(self.cancel)
        row.addWidget(self.cancel_install_button)
        self.install_status = QLabel("", box)
        self.install_status.setWordWrap(True)
        row.addWidget(self.install_status, 1)
        form.addRow(row)
        return box

    # -- state ---------------------------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.check_button.setEnabled(not running)
        self.install_button.setEnabled(not running)
        self.cancel_install_button.setEnabled(running and self.installing())

    def installing(self) -> bool:
        return self.installer is not None and self.installer.is_running()

    def is_busy(self) -> bool:
        return (self.job is not None and self.job.is_running()) or self.installing()

    def cancel(self) -> None:
        """Cancel an install (the doctor is short: it is only ended at shutdown)."""
        if self.installing():
            self.installer.cancel()

    def shutdown(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            job.shutdown()
        if self.installer is not None:
            installer, self.installer = self.installer, None
            installer.shutdown()

    # -- engine --------------------------------------------------------------------------------------------
    def check_engine(self) -> None:
        """Run ``rs-engine doctor`` and show its report; ``engine_status`` turns green or red."""
        if self.dock.is_busy():
            return
        self.doctor_view.setPlainText("running rs-engine doctor...")
        self._set_status("checking...", "")
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
            self._set_status("engine OK", OK_STYLE)
            self.dock.notify("engine OK", Qgis.Success, 3)
        else:
            self.doctor_view.setPlainText(result.message)
            self._set_status("engine check failed", FAILED_STYLE)
            self.dock.notify(f"engine check failed: {result.message}", Qgis.Critical)

    def _set_status(self, text: str, style: str) -> None:
        self.engine_status.setText(text)
        self.engine_status.setStyleSheet(style)

    def install_engine(self) -> None:
        """Install the engine chosen in the combo (see :mod:`.installer`); on success it becomes the engine Python
        and is checked; on failure one line goes to the message bar and the old setting stays."""
        if self.dock.is_busy():
            return
        try:
            plan = make_plan(full=self.kind_combo.currentData() == FULL,
                             wheel_folder=self.wheel_folder_widget.filePath())
        except InstallError as exc:
            self.dock.notify(str(exc), Qgis.Critical)
            return
        if plan.wheel is None:
            self.dock.append_log("no engine wheel in this plugin build: installing delineate from "
                                 f"{plan.wheel_folder or 'the package index'}")
        self.installer = EngineInstaller(plan, self)
        self.installer.logLine.connect(self.dock.append_log)
        self.installer.stepStarted.connect(lambda title: self.install_status.setText(title + "..."))
        self.installer.progress.connect(self.dock.progress.setValue)
        self.installer.installFinished.connect(self._on_installed)
        self.dock.progress.setValue(0)
        self.installer.start()
        if self.installer is not None:  # not ended already (a step that could not start ends at once)
            self.dock.set_running(True)

    def _on_installed(self, result: InstallResult) -> None:
        if self.installer is not None:
            self.installer.deleteLater()
            self.installer = None
        self.dock.set_running(False)
        self.install_status.setText("installed" if result.ok else "cancelled" if result.cancelled else "failed")
        if not result.ok:
            self.dock.notify(result.message, Qgis.Warning if result.cancelled else Qgis.Critical)
            return
        self.dock.notify(result.message, Qgis.Success, 5)
        self.python_widget.blockSignals(True)  # one refresh of the model list, below
        self.python_widget.setFilePath(result.python)
        self.python_widget.blockSignals(False)
        self._on_python_changed(result.python)
        self.check_engine()

    def _on_python_changed(self, path: str) -> None:
        settings.set_engine_python(path)
        self._set_status("not checked", "")
        self._show_command()
        self.dock.catalog.refresh()

    def _show_command(self) -> None:
        try:
            command = settings.engine_command("rs-engine")
            self.command_label.setText("engine command: " + " ".join(command.argv([])))
        except settings.EngineNotFound as exc:
            self.command_label.setText(str(exc))
