"""The Delineate dock: Segment, Retrain and Settings tabs over a shared progress bar and log.

Every engine run is an :class:`~.engine.EngineJob` (its own process; QGIS never waits on it). Several rasters run
one after the other, each into its own GeoPackage and its own layer named after the raster and the model. Non-file
rasters (XYZ, WMS, ...) are first rendered through QGIS into a temporary GeoTIFF by a background QgsTask.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsFeedback,
    QgsMapLayer,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from . import settings
from .commands import describe_epoch, finetune_args, finetune_percent, segment_args, segment_percent
from .engine import EngineJob, EngineResult, log, remove_partial_outputs
from .layers import (
    LayerError,
    add_result_layer,
    band_selection,
    raster_file,
    render_pipe,
    render_pixel_size,
    result_layer_name,
    transform_extent,
    vector_file,
    write_pipe,
)
from .models import ModelCatalog, ModelInfo

EXTENT_LAYER, EXTENT_CANVAS, EXTENT_SELECTION = range(3)
DEVICES = ["auto", "cpu", "cuda"]


def _safe(text: str) -> str:
    """A file-name-safe version of a layer or model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"


@dataclass
class SegmentRun:
    """One raster of a Segment click: what to read, where to write, and what came out."""

    layer_id: str
    layer_name: str
    crs: QgsCoordinateReferenceSystem
    output: str
    temporary_output: bool
    source: str | None  # raster file, None until rendered
    extent: QgsRectangle | None  # in the raster's CRS; None: whole raster
    bands: str
    render_path: str | None = None
    result: EngineResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RenderTask(QgsTask):
    """Renders a non-file raster's extent into a GeoTIFF in the background (see :func:`write_pipe`); the render
    pipe (a clone of the layer's provider) is built here, in the main thread."""

    def __init__(self, layer: QgsRasterLayer, extent: QgsRectangle, pixel_size: float, path: str) -> None:
        super().__init__(f"Delineate: render {layer.name()}", QgsTask.CanCancel)
        self.layer_name, self.extent, self.pixel_size, self.path = layer.name(), extent, pixel_size, path
        self.crs = layer.crs()
        self.pipe = render_pipe(layer)
        self.error = ""
        self.feedback = QgsFeedback()

    def run(self) -> bool:
        try:
            write_pipe(self.pipe, self.crs, self.extent, self.pixel_size, self.path, self.feedback, self.layer_name)
        except LayerError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # a task must not raise: report it like any failure
            self.error = f"{self.layer_name}: rendering failed: {type(exc).__name__}: {exc}"
            return False
        return not self.isCanceled()

    def cancel(self) -> None:
        self.feedback.cancel()
        super().cancel()


class DelineateDock(QgsDockWidget):
    """The plugin's panel. Signals for callers and tests: ``runFinished(EngineResult)`` after the last raster of
    a Segment click (or the first failure), ``trainFinished(EngineResult)`` after a Retrain run."""

    runFinished = pyqtSignal(object)
    trainFinished = pyqtSignal(object)

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__("Delineate", parent)
        self.setObjectName("DelineateDock")
        self.iface = iface
        self.job: EngineJob | None = None
        self.render_task: RenderTask | None = None
        self.queue: list[SegmentRun] = []
        self.finished_runs: list[SegmentRun] = []
        self.added_layers: list[QgsVectorLayer] = []
        self._cancelling = False
        self._tmpdir: str | None = None
        self._select_after_refresh: str | None = None
        self._train_output: str | None = None
        self._run_model: ModelInfo | str | None = None
        self.catalog = ModelCatalog(self)
        self.catalog.changed.connect(self._on_models)
        self.catalog.failed.connect(lambda msg: self._notify(f"could not list models: {msg}", Qgis.Warning))

        body = QWidget(self)
        layout = QVBoxLayout(body)
        self.tabs = QTabWidget(body)
        self.tabs.addTab(self._build_segment_tab(), "Segment")
        self.tabs.addTab(self._build_train_tab(), "Retrain")
        self.tabs.addTab(self._build_settings_tab(), "Settings")
        layout.addWidget(self.tabs)
        self.progress = QProgressBar(body)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.log_view = QPlainTextEdit(body)
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(2000)
        self.log_view.setPlaceholderText("engine log")
        layout.addWidget(self.log_view, 1)
        self.setWidget(body)

        project = QgsProject.instance()
        project.layersAdded.connect(self._refresh_raster_lists)
        project.layersRemoved.connect(self._refresh_raster_lists)
        self._refresh_raster_lists()
        self._set_running(False)
        self.catalog.refresh()

    # -- building ------------------------------------------------------------------------------------------
    def _build_segment_tab(self) -> QWidget:
        tab = QWidget(self)
        form = QFormLayout(tab)
        self.raster_list = QListWidget(tab)
        self.raster_list.setToolTip("Raster layers to segment (each gives its own result layer)")
        self.raster_list.setMaximumHeight(110)
        self.raster_list.itemChanged.connect(lambda _item: self._prefill_bands())
        form.addRow("Rasters", self.raster_list)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox(tab)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        model_row.addWidget(self.model_combo, 1)
        self.add_model_button = QToolButton(tab)
        self.add_model_button.setText("+")
        self.add_model_button.setToolTip("Add a model file (.safetensors)")
        self.add_model_button.clicked.connect(self._add_model_file)
        model_row.addWidget(self.add_model_button)
        self.refresh_models_button = QToolButton(tab)
        self.refresh_models_button.setText("↻")
        self.refresh_models_button.setToolTip("Ask the engine for the model list again")
        self.refresh_models_button.clicked.connect(lambda: self.catalog.refresh())
        model_row.addWidget(self.refresh_models_button)
        form.addRow("Model", model_row)
        self.model_info = QLabel("asking the engine for its models...", tab)
        self.model_info.setWordWrap(True)
        self.model_info.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.MinimumExpanding)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow("", self.model_info)

        extent_row = QHBoxLayout()
        self.extent_combo = QComboBox(tab)
        self.extent_combo.addItems(["Whole layer", "Map canvas", "Selected features of"])
        extent_row.addWidget(self.extent_combo)
        self.extent_layer_combo = QgsMapLayerComboBox(tab)
        self.extent_layer_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.extent_layer_combo.setEnabled(False)
        self.extent_combo.currentIndexChanged.connect(
            lambda i: self.extent_layer_combo.setEnabled(i == EXTENT_SELECTION))
        extent_row.addWidget(self.extent_layer_combo, 1)
        form.addRow("Extent", extent_row)

        self.tile_spin = QSpinBox(tab)
        self.tile_spin.setRange(32, 8192)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setSuffix(" px")
        form.addRow("Tile size", self.tile_spin)
        self.overlap_spin = QSpinBox(tab)
        self.overlap_spin.setRange(0, 4096)
        self.overlap_spin.setSingleStep(16)
        self.overlap_spin.setSuffix(" px")
        form.addRow("Overlap", self.overlap_spin)
        self.score_spin = QDoubleSpinBox(tab)
        self.score_spin.setRange(0.0, 1.0)
        self.score_spin.setSingleStep(0.05)
        self.score_spin.setDecimals(2)
        form.addRow("Score threshold", self.score_spin)
        self.bands_edit = QLineEdit(tab)
        self.bands_edit.setPlaceholderText("model default (first bands)")
        self.bands_edit.setToolTip("1-based bands, comma-separated; repeats allowed (1,1,1: one band to an RGB "
                                   "model)")
        form.addRow("Bands", self.bands_edit)
        self.device_combo = QComboBox(tab)
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)
        self.output_widget = QgsFileWidget(tab)
        self.output_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.output_widget.setFilter("GeoPackage (*.gpkg)")
        self.output_widget.lineEdit().setPlaceholderText("[temporary file]")
        self.output_widget.setToolTip("Empty: a temporary GeoPackage per raster")
        form.addRow("Output", self.output_widget)

        buttons = QHBoxLayout()
        self.segment_button = QPushButton("Segment", tab)
        self.segment_button.clicked.connect(self.start_segment)
        buttons.addWidget(self.segment_button)
        self.cancel_button = QPushButton("Cancel", tab)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        return tab

    def _build_train_tab(self) -> QWidget:
        tab = QWidget(self)
        form = QFormLayout(tab)
        self.labels_combo = QgsMapLayerComboBox(tab)
        self.labels_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        form.addRow("Polygons", self.labels_combo)
        self.class_field_combo = QgsFieldComboBox(tab)
        self.labels_combo.layerChanged.connect(self.class_field_combo.setLayer)
        self.class_field_combo.setLayer(self.labels_combo.currentLayer())
        form.addRow("Class field", self.class_field_combo)
        self.train_raster_list = QListWidget(tab)
        self.train_raster_list.setMaximumHeight(90)
        form.addRow("Rasters", self.train_raster_list)
        self.aoi_combo = QgsMapLayerComboBox(tab)
        self.aoi_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.aoi_combo.setAllowEmptyLayer(True)
        self.aoi_combo.setLayer(None)
        self.aoi_combo.setToolTip("Annotated area; empty: around the polygons")
        form.addRow("AOI (optional)", self.aoi_combo)
        self.base_model_combo = QComboBox(tab)
        form.addRow("Base model", self.base_model_combo)
        self.epochs_spin = QSpinBox(tab)
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(20)
        form.addRow("Epochs", self.epochs_spin)
        self.chip_spin = QSpinBox(tab)
        self.chip_spin.setRange(0, 4096)
        self.chip_spin.setSpecialValueText("base model's tile")
        form.addRow("Chip size", self.chip_spin)
        self.extra_edit = QLineEdit(tab)
        self.extra_edit.setPlaceholderText("e.g. --chips-per-epoch 64 --batch-size 2 --max-minutes 15")
        form.addRow("Extra arguments", self.extra_edit)
        self.model_output_widget = QgsFileWidget(tab)
        self.model_output_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.model_output_widget.setFilter("Delineate model (*.safetensors)")
        self.model_output_widget.lineEdit().setPlaceholderText(f"[{settings.default_models_dir()}/...]")
        form.addRow("New model", self.model_output_widget)
        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train", tab)
        self.train_button.clicked.connect(self.start_train)
        buttons.addWidget(self.train_button)
        self.train_cancel_button = QPushButton("Cancel", tab)
        self.train_cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.train_cancel_button)
        form.addRow(buttons)
        self.train_status = QLabel("", tab)
        self.train_status.setWordWrap(True)
        form.addRow(self.train_status)
        return tab

    def _build_settings_tab(self) -> QWidget:
        tab = QWidget(self)
        layout = QVBoxLayout(tab)
        form = QFormLayout()
        self.python_widget = QgsFileWidget(tab)
        self.python_widget.setStorageMode(QgsFileWidget.GetFile)
        self.python_widget.setFilePath(settings.engine_python())
        self.python_widget.lineEdit().setPlaceholderText("automatic (repository .venv, else rs-engine on PATH)")
        self.python_widget.fileChanged.connect(self._on_python_changed)
        form.addRow("Engine Python", self.python_widget)
        layout.addLayout(form)
        self.command_label = QLabel("", tab)
        self.command_label.setWordWrap(True)
        self.command_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.command_label)
        self.check_button = QPushButton("Check engine", tab)
        self.check_button.clicked.connect(self.check_engine)
        layout.addWidget(self.check_button)
        self.doctor_view = QPlainTextEdit(tab)
        self.doctor_view.setReadOnly(True)
        self.doctor_view.setPlaceholderText("rs-engine doctor output")
        layout.addWidget(self.doctor_view, 1)
        self._show_command()
        return tab

    # -- helpers -------------------------------------------------------------------------------------------
    def _notify(self, text: str, level: Qgis.MessageLevel = Qgis.Info, duration: int = 8) -> None:
        """Message bar + dock log + QGIS message log."""
        self.append_log(text)
        log(text, level)
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is not None:
            bar.pushMessage("Delineate", text, level, 0 if level == Qgis.Critical else duration)

    def append_log(self, text: str) -> None:
        """One line in the dock's log (with the time)."""
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def _temp_dir(self) -> str:
        if self._tmpdir is None or not os.path.isdir(self._tmpdir):
            self._tmpdir = tempfile.mkdtemp(prefix="delineate_")
        return self._tmpdir

    def _refresh_raster_lists(self, *_args: Any) -> None:
        for widget in (self.raster_list, self.train_raster_list):
            checked = {widget.item(i).data(Qt.UserRole) for i in range(widget.count())
                       if widget.item(i).checkState() == Qt.Checked}
            widget.blockSignals(True)
            widget.clear()
            for layer in QgsProject.instance().mapLayers().values():
                if layer.type() != QgsMapLayer.RasterLayer:
                    continue
                suffix = "" if raster_file(layer) else "  (rendered through QGIS)"
                item = QListWidgetItem(layer.name() + suffix, widget)
                item.setData(Qt.UserRole, layer.id())
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if layer.id() in checked else Qt.Unchecked)
            widget.blockSignals(False)
        self._prefill_bands()

    def set_checked_rasters(self, layer_ids: list[str], train: bool = False) -> None:
        """Check exactly these raster layers in the Segment (or Retrain) list."""
        widget = self.train_raster_list if train else self.raster_list
        for i in range(widget.count()):
            item = widget.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in layer_ids else Qt.Unchecked)

    def _checked_layers(self, widget: QListWidget) -> list[QgsRasterLayer]:
        layers = []
        for i in range(widget.count()):
            item = widget.item(i)
            if item.checkState() == Qt.Checked:
                layer = QgsProject.instance().mapLayer(item.data(Qt.UserRole))
                if isinstance(layer, QgsRasterLayer):
                    layers.append(layer)
        return layers

    def selected_model(self) -> ModelInfo | None:
        """The model chosen in the Segment tab."""
        key = self.model_combo.currentData()
        return self.catalog.find(key) if key else None

    def _on_models(self) -> None:
        for combo in (self.model_combo, self.base_model_combo):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for model in self.catalog.models:
                combo.addItem(model.label(), model.key)
                combo.setItemData(combo.count() - 1, model.summary(), Qt.ToolTipRole)
            wanted = self._select_after_refresh if combo is self.model_combo else None
            index = combo.findData(wanted or current)
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(False)
        self._select_after_refresh = None
        self._on_model_changed()

    def select_model(self, key: str) -> None:
        """Choose a model by key (bundled name or path) in the Segment tab."""
        index = self.model_combo.findData(key)
        if index >= 0:
            self.model_combo.setCurrentIndex(index)

    def _on_model_changed(self, *_args: Any) -> None:
        model = self.selected_model()
        if model is None:
            self.model_info.setText("no model (check the engine in Settings)")
            return
        self.model_info.setText(model.summary())
        self.tile_spin.setValue(model.tile_size)
        self.overlap_spin.setValue(model.overlap)
        self.score_spin.setValue(model.score_threshold)
        self.device_combo.setCurrentIndex(0)
        self._prefill_bands()

    def _prefill_bands(self) -> None:
        model = self.selected_model() if hasattr(self, "model_combo") else None
        layers = self._checked_layers(self.raster_list) if hasattr(self, "raster_list") else []
        if model is None or not layers:
            return
        layer = layers[0]
        self.bands_edit.setText(band_selection(layer.bandCount(), model.bands, rendered=raster_file(layer) is None))

    def _add_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a Delineate model", "", "Delineate model (*.safetensors)")
        if path:
            self.register_model(path)

    def register_model(self, path: str) -> None:
        """Remember a model file, refresh the list from the engine and select it."""
        settings.add_user_model(path)
        self._select_after_refresh = os.path.abspath(path)
        self.catalog.refresh()

    def _on_python_changed(self, path: str) -> None:
        settings.set_engine_python(path)
        self._show_command()
        self.catalog.refresh()

    def _show_command(self) -> None:
        try:
            command = settings.engine_command("rs-engine")
            self.command_label.setText("engine command: " + " ".join(command.argv([])))
        except settings.EngineNotFound as exc:
            self.command_label.setText(str(exc))

    def _set_running(self, running: bool) -> None:
        for widget in (self.segment_button, self.train_button, self.check_button):
            widget.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.train_cancel_button.setEnabled(running)
        if not running:
            self._cancelling = False

    def is_busy(self) -> bool:
        """True while an engine process or a render task runs."""
        return bool((self.job is not None and self.job.is_running()) or self.render_task is not None or self.queue)

    # -- segment -------------------------------------------------------------------------------------------
    def _extent_for(self, layer: QgsRasterLayer) -> QgsRectangle | None:
        """The chosen extent in the raster's CRS (None: whole layer). Raises LayerError."""
        mode = self.extent_combo.currentIndex()
        if mode == EXTENT_LAYER:
            return None
        if mode == EXTENT_CANVAS:
            canvas = self.iface.mapCanvas()
            rect = transform_extent(canvas.extent(), canvas.mapSettings().destinationCrs(), layer.crs())
        else:
            polygons = self.extent_layer_combo.currentLayer()
            if not isinstance(polygons, QgsVectorLayer) or polygons.selectedFeatureCount() == 0:
                raise LayerError("Extent: select features of a polygon layer first")
            rect = transform_extent(polygons.boundingBoxOfSelected(), polygons.crs(), layer.crs())
        if raster_file(layer):
            rect = rect.intersect(layer.extent())
        if rect.isEmpty():
            raise LayerError(f"{layer.name()}: the chosen extent does not overlap it")
        return rect

    def start_segment(self) -> None:
        """Segment click: plan one run per checked raster, then start the first."""
        if self.is_busy():
            return
        model = self.selected_model()
        if model is None:
            self._notify("no model: check the engine in the Settings tab", Qgis.Warning)
            return
        layers = self._checked_layers(self.raster_list)
        if not layers and isinstance(self.iface.activeLayer(), QgsRasterLayer):
            layers = [self.iface.activeLayer()]
        if not layers:
            self._notify("check the raster layer(s) to segment", Qgis.Warning)
            return
        chosen = self.output_widget.filePath().strip()
        runs = []
        try:
            stamp = int(time.time() * 1000)
            for i, layer in enumerate(layers):
                extent = self._extent_for(layer)
                if chosen:
                    output = chosen if len(layers) == 1 else str(
                        Path(chosen).with_name(f"{Path(chosen).stem}_{_safe(layer.name())}.gpkg"))
                    if not output.lower().endswith(".gpkg"):
                        output += ".gpkg"
                else:
                    output = os.path.join(self._temp_dir(),
                                          f"{_safe(layer.name())}_{_safe(model.name)}_{stamp}_{i}.gpkg")
                bands = self.bands_edit.text().strip() if layer is layers[0] else band_selection(
                    layer.bandCount(), model.bands, rendered=raster_file(layer) is None)
                runs.append(SegmentRun(layer.id(), layer.name(), layer.crs(), output, not chosen,
                                       raster_file(layer), extent, bands))
        except LayerError as exc:
            self._notify(str(exc), Qgis.Warning)
            return
        self.queue, self.finished_runs, self._run_model = runs, [], model
        self.progress.setValue(0)
        self._set_running(True)
        self.append_log(f"segment {len(runs)} raster(s) with {model.name}")
        self._next_run()

    def _next_run(self) -> None:
        if not self.queue:
            return
        run = self.queue[0]
        if run.source is None:
            self._render(run)
            return
        model = self._run_model
        args = segment_args([run.source], run.output, model.key, tile_size=self.tile_spin.value(),
                            overlap=self.overlap_spin.value(), score_threshold=self.score_spin.value(),
                            bands=run.bands, device=self.device_combo.currentText(),
                            extent=(run.extent.xMinimum(), run.extent.yMinimum(), run.extent.xMaximum(),
                                    run.extent.yMaximum()) if run.extent is not None else None)
        self.append_log(f"{run.layer_name}: rs-engine {' '.join(args)}")
        self._start_job("rs-engine", args, self._on_segment_event, self._on_segment_finished)

    def _render(self, run: SegmentRun) -> None:
        layer = QgsProject.instance().mapLayer(run.layer_id)
        if not isinstance(layer, QgsRasterLayer):
            self._end_queue(EngineResult(ok=False, message=f"{run.layer_name}: layer was removed"))
            return
        extent = run.extent
        if extent is None:  # a web layer's "whole layer" is the world: use the map canvas
            canvas = self.iface.mapCanvas()
            extent = transform_extent(canvas.extent(), canvas.mapSettings().destinationCrs(), layer.crs())
        model = self._run_model
        pixel = render_pixel_size(layer, model.gsd, extent)
        run.render_path = os.path.join(self._temp_dir(), f"render_{_safe(layer.name())}_{int(time.time())}.tif")
        self.append_log(f"{run.layer_name}: rendering {extent.toString(1)} at {pixel:g} map units/px")
        try:
            task = RenderTask(layer, extent, pixel, run.render_path)
        except LayerError as exc:
            self._end_queue(EngineResult(ok=False, message=str(exc)))
            return
        task.taskCompleted.connect(lambda: self._on_rendered(run, task))
        task.taskTerminated.connect(lambda: self._on_rendered(run, task))
        self.render_task = task
        QgsApplication.taskManager().addTask(task)

    def _on_rendered(self, run: SegmentRun, task: RenderTask) -> None:
        self.render_task = None
        if self._cancelling:
            self._discard(run)
            self._end_queue(EngineResult(ok=False, cancelled=True, message="cancelled"))
            return
        if task.status() != QgsTask.Complete:
            self._end_queue(EngineResult(ok=False, message=task.error or f"{run.layer_name}: rendering failed"))
            return
        run.source, run.extent = run.render_path, None
        self._next_run()

    def _start_job(self, tool: str, args: list[str], on_event: Any, on_finished: Any) -> None:
        self.job = EngineJob(tool, args, parent=self)
        self.job.engineEvent.connect(on_event)
        self.job.logLine.connect(self.append_log)
        self.job.jobFinished.connect(on_finished)
        self.job.start()

    def _on_segment_event(self, event: dict) -> None:
        if event.get("event") == "progress":
            value = segment_percent(event)
            total = len(self.queue) + len(self.finished_runs)
            if value is not None and total:
                self.progress.setValue(int((len(self.finished_runs) * 100 + value) / total))

    def _on_segment_finished(self, result: EngineResult) -> None:
        run = self.queue[0] if self.queue else None
        pid = self.job.pid if self.job is not None else 0
        self._drop_job()
        if run is None:
            return
        run.result = result
        if not result.ok:
            remove_partial_outputs(run.output, pid or None)
            self._discard(run)
            self._end_queue(result)
            return
        try:
            name = result_layer_name(run.layer_name, self._run_model.name)
            layer = add_result_layer(run.output, name)
            self.added_layers.append(layer)
            self.append_log(f"{run.layer_name}: {result.done.get('features', '?')} instances -> {run.output}")
        except LayerError as exc:
            self._end_queue(EngineResult(ok=False, message=str(exc)))
            return
        finally:
            if run.render_path:
                self._remove(run.render_path)
        self.finished_runs.append(self.queue.pop(0))
        if self.queue:
            self._next_run()
        else:
            self._end_queue(result)

    def _discard(self, run: SegmentRun) -> None:
        """Remove what a failed or cancelled run left: its temporary output and its rendered raster."""
        if run.temporary_output:
            self._remove(run.output)
        if run.render_path:
            self._remove(run.render_path)

    @staticmethod
    def _remove(path: str) -> None:
        for candidate in (path, path + ".aux.xml"):
            if os.path.exists(candidate):
                try:
                    os.remove(candidate)
                except OSError as exc:
                    log(f"could not remove {candidate}: {exc}", Qgis.Warning)

    def _end_queue(self, result: EngineResult) -> None:
        remaining = self.queue
        self.queue = []
        for run in remaining[1:]:
            self._discard(run)
        if result.ok:
            self.progress.setValue(100)
            total = sum(int(r.result.done.get("features", 0)) for r in self.finished_runs if r.result)
            self._notify(f"{len(self.finished_runs)} layer(s) added, {total} instances", Qgis.Success, 5)
        elif result.cancelled:
            self.progress.setValue(0)
            self._notify("segmentation cancelled", Qgis.Info, 4)
        else:
            self.progress.setValue(0)
            self._notify(result.message, Qgis.Critical)
        self._set_running(False)
        self.runFinished.emit(result)

    def _drop_job(self) -> None:
        if self.job is not None:
            self.job.deleteLater()
            self.job = None

    def cancel(self) -> None:
        """Cancel: end the engine process (SIGTERM, then kill) or the render task; nothing is added."""
        if not self.is_busy():
            return
        self._cancelling = True
        self.append_log("cancel requested")
        if self.job is not None and self.job.is_running():
            self.job.cancel()
        elif self.render_task is not None:
            self.render_task.cancel()

    # -- retrain -------------------------------------------------------------------------------------------
    def start_train(self) -> None:
        """Train click: write unsaved or non-file layers to GeoPackages, then run ``rs-train finetune``."""
        if self.is_busy():
            return
        labels = self.labels_combo.currentLayer()
        class_field = self.class_field_combo.currentField()
        rasters = self._checked_layers(self.train_raster_list)
        base = self.base_model_combo.currentData()
        if not isinstance(labels, QgsVectorLayer) or not class_field or not rasters or not base:
            self._notify("Retrain needs a polygon layer, its class field, checked raster(s) and a base model",
                         Qgis.Warning)
            return
        try:
            folder = os.path.join(self._temp_dir(), f"train_{int(time.time())}")
            labels_path = vector_file(labels, folder)
            aoi = self.aoi_combo.currentLayer()
            aoi_path = vector_file(aoi, folder) if isinstance(aoi, QgsVectorLayer) else None
            raster_paths = []
            for layer in rasters:
                path = raster_file(layer)
                if path is None:
                    raise LayerError(f"{layer.name()}: training needs a raster file (export it first)")
                raster_paths.append(path)
        except LayerError as exc:
            self._notify(str(exc), Qgis.Warning)
            return
        output = self.model_output_widget.filePath().strip()
        if not output:
            output = str(settings.default_models_dir() / f"{_safe(labels.name())}-{time.strftime('%Y%m%d-%H%M')}"
                                                         ".safetensors")
        if not output.lower().endswith(".safetensors"):
            output += ".safetensors"
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        args = finetune_args(raster_paths, labels_path, class_field, base, output, epochs=self.epochs_spin.value(),
                             aoi=aoi_path, chip_size=self.chip_spin.value() or None,
                             extra_args=self.extra_edit.text())
        self._train_output = output
        self.progress.setValue(0)
        self.train_status.setText("starting...")
        self._set_running(True)
        self.append_log("rs-train " + " ".join(args))
        self._start_job("rs-train", args, self._on_train_event, self._on_train_finished)

    def _on_train_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            value = finetune_percent(event)
            if value is not None:
                self.progress.setValue(int(value))
            self.train_status.setText(f"epoch {event.get('epoch')}/{event.get('epochs')}, step {event.get('done')}/"
                                      f"{event.get('total')}, loss {event.get('loss')}")
        elif kind == "epoch":
            line = describe_epoch(event)
            self.train_status.setText(line)
            self.append_log(line)

    def _on_train_finished(self, result: EngineResult) -> None:
        self._drop_job()
        self._set_running(False)
        if result.ok:
            model = str(result.done.get("output") or self._train_output)
            metrics = result.done.get("metrics") or {}
            ap = (metrics.get("segm") or {}).get("AP")
            self.progress.setValue(100)
            self.train_status.setText(f"done: {model} (validation mask AP {ap})")
            self.register_model(model)
            self._notify(f"new model {os.path.basename(model)} (validation mask AP {ap}) added to the model list",
                         Qgis.Success, 8)
        elif result.cancelled:
            self.train_status.setText("cancelled (train again with the same settings to resume)")
            self._notify("training cancelled; its checkpoint is kept", Qgis.Info, 4)
        else:
            self.train_status.setText(result.message)
            self._notify(result.message, Qgis.Critical)
        self.trainFinished.emit(result)

    # -- settings ------------------------------------------------------------------------------------------
    def check_engine(self) -> None:
        """Run ``rs-engine doctor`` and show its report in the Settings tab."""
        if self.is_busy():
            return
        self.doctor_view.setPlainText("running rs-engine doctor...")
        self.job = EngineJob("rs-engine", ["doctor"], parent=self, jsonl=False)
        self.job.jobFinished.connect(self._on_doctor)
        self._set_running(True)
        self.job.start()

    def _on_doctor(self, result: EngineResult) -> None:
        self._drop_job()
        self._set_running(False)
        if result.ok:
            self.doctor_view.setPlainText(result.stdout)
            self._notify("engine OK", Qgis.Success, 3)
        else:
            self.doctor_view.setPlainText(result.message)
            self._notify(f"engine check failed: {result.message}", Qgis.Critical)

    # -- teardown ------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """End every process and task this dock started and disconnect from the project (plugin unload)."""
        project = QgsProject.instance()
        for signal in (project.layersAdded, project.layersRemoved):
            try:
                signal.disconnect(self._refresh_raster_lists)
            except TypeError:
                pass
        runs, self.queue = self.queue, []
        if self.render_task is not None:
            self.render_task.cancel()
            self.render_task = None
        if self.job is not None:
            job = self.job
            job.jobFinished.disconnect()
            job.cancel()  # SIGTERM first: rs-train saves its checkpoint, rs-engine removes its temp file
            job.wait(timeout_s=10)  # kills it after kill_timeout_ms
            if runs:
                remove_partial_outputs(runs[0].output, job.pid or None)
            self._drop_job()
        for run in runs:
            self._discard(run)
        self.catalog.shutdown()
