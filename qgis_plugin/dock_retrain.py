"""The dock's Retrain tab: fine-tune a model on a polygon layer over raster(s) with ``rs-train finetune`` in its own
process; unsaved or non-file polygon layers go through a temporary GeoPackage; the new model joins the model
list."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsVectorLayer
from qgis.gui import QgsFieldComboBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QWidget

from . import settings
from .commands import describe_epoch, finetune_args, finetune_percent
from .engine import EngineJob, EngineResult
from .layers import LayerError, raster_file, safe_name, vector_file
from .widgets import RasterList, fill_model_combo

if TYPE_CHECKING:
    from .dock import DelineateDock


class RetrainTab(QWidget):
    """Fine-tune a model; the dock's ``trainFinished`` fires after each run. ``job``: the running ``rs-train``."""

    def __init__(self, dock: DelineateDock) -> None:
        super().__init__(dock)
        self.dock = dock
        self.job: EngineJob | None = None
        self._output: str | None = None
        self._build()
        dock.catalog.changed.connect(self._on_models)

    def _build(self) -> None:
        form = QFormLayout(self)
        self.labels_combo = QgsMapLayerComboBox(self)
        self.labels_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        form.addRow("Polygons", self.labels_combo)
        self.class_field_combo = QgsFieldComboBox(self)
        self.labels_combo.layerChanged.connect(self.class_field_combo.setLayer)
        self.class_field_combo.setLayer(self.labels_combo.currentLayer())
        form.addRow("Class field", self.class_field_combo)
        self.raster_list = RasterList("Rasters the polygons outline objects in", 90, self)
        form.addRow("Rasters", self.raster_list)
        self.aoi_combo = QgsMapLayerComboBox(self)
        self.aoi_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.aoi_combo.setAllowEmptyLayer(True)
        self.aoi_combo.setLayer(None)
        self.aoi_combo.setToolTip("Annotated area; empty: around the polygons")
        form.addRow("AOI (optional)", self.aoi_combo)
        self.base_model_combo = QComboBox(self)
        form.addRow("Base model", self.base_model_combo)
        self.epochs_spin = QSpinBox(self)
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(20)
        form.addRow("Epochs", self.epochs_spin)
        self.chip_spin = QSpinBox(self)
        self.chip_spin.setRange(0, 4096)
        self.chip_spin.setSpecialValueText("base model's tile")
        form.addRow("Chip size", self.chip_spin)
        self.extra_edit = QLineEdit(self)
        self.extra_edit.setPlaceholderText("e.g. --chips-per-epoch 64 --batch-size 2 --max-minutes 15")
        form.addRow("Extra arguments", self.extra_edit)
        self.model_output_widget = QgsFileWidget(self)
        self.model_output_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.model_output_widget.setFilter("Delineate model (*.safetensors)")
        self.model_output_widget.lineEdit().setPlaceholderText(f"[{settings.default_models_dir()}/...]")
        form.addRow("New model", self.model_output_widget)
        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train", self)
        self.train_button.clicked.connect(self.start_train)
        buttons.addWidget(self.train_button)
        self.train_cancel_button = QPushButton("Cancel", self)
        self.train_cancel_button.clicked.connect(self.dock.cancel)
        buttons.addWidget(self.train_cancel_button)
        form.addRow(buttons)
        self.train_status = QLabel("", self)
        self.train_status.setWordWrap(True)
        form.addRow(self.train_status)

    # -- state ---------------------------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.train_button.setEnabled(not running)
        self.train_cancel_button.setEnabled(running)

    def is_busy(self) -> bool:
        return self.job is not None and self.job.is_running()

    def cancel(self) -> None:
        if self.is_busy():
            self.dock.append_log("cancel requested")
            self.job.cancel()

    def shutdown(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            job.shutdown()

    def _on_models(self) -> None:
        fill_model_combo(self.base_model_combo, self.dock.catalog.models)

    # -- train ---------------------------------------------------------------------------------------------
    def start_train(self) -> None:
        """Train click: write unsaved or non-file layers to GeoPackages, then run ``rs-train finetune``."""
        if self.dock.is_busy():
            return
        labels = self.labels_combo.currentLayer()
        class_field = self.class_field_combo.currentField()
        rasters = self.raster_list.checked_layers()
        base = self.base_model_combo.currentData()
        if not isinstance(labels, QgsVectorLayer) or not class_field or not rasters or not base:
            self.dock.notify("Retrain needs a polygon layer, its class field, checked raster(s) and a base model",
                             Qgis.Warning)
            return
        try:
            folder = os.path.join(self.dock.temp_dir(), f"train_{int(time.time())}")
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
            self.dock.notify(str(exc), Qgis.Warning)
            return
        output = self.model_output_widget.filePath().strip()
        if not output:
            output = str(settings.default_models_dir()
                         / f"{safe_name(labels.name())}-{time.strftime('%Y%m%d-%H%M')}.safetensors")
        if not output.lower().endswith(".safetensors"):
            output += ".safetensors"
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        args = finetune_args(raster_paths, labels_path, class_field, base, output, epochs=self.epochs_spin.value(),
                             aoi=aoi_path, chip_size=self.chip_spin.value() or None,
                             extra_args=self.extra_edit.text())
        self._output = output
        self.dock.progress.setValue(0)
        self.train_status.setText("starting...")
        self.dock.set_running(True)
        self.dock.append_log("rs-train " + " ".join(args))
        self.job = EngineJob("rs-train", args, parent=self)
        self.job.engineEvent.connect(self._on_event)
        self.job.logLine.connect(self.dock.append_log)
        self.job.jobFinished.connect(self._on_finished)
        self.job.start()

    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            value = finetune_percent(event)
            if value is not None:
                self.dock.progress.setValue(int(value))
            self.train_status.setText(f"epoch {event.get('epoch')}/{event.get('epochs')}, step {event.get('done')}/"
                                      f"{event.get('total')}, loss {event.get('loss')}")
        elif kind == "epoch":
            line = describe_epoch(event)
            self.train_status.setText(line)
            self.dock.append_log(line)

    def _on_finished(self, result: EngineResult) -> None:
        if self.job is not None:
            self.job.deleteLater()
            self.job = None
        self.dock.set_running(False)
        if result.ok:
            model = str(result.done.get("output") or self._output)
            metrics = result.done.get("metrics") or {}
            ap = (metrics.get("segm") or {}).get("AP")
            self.dock.progress.setValue(100)
            self.train_status.setText(f"done: {model} (validation mask AP {ap})")
            self.dock.register_model(model)
            self.dock.notify(f"new model {os.path.basename(model)} (validation mask AP {ap}) added to the model "
                             "list", Qgis.Success, 8)
        elif result.cancelled:
            self.train_status.setText("cancelled (train again with the same settings to resume)")
            self.dock.notify("training cancelled; its checkpoint is kept", Qgis.Info, 4)
        else:
            self.train_status.setText(result.message)
            self.dock.notify(result.message, Qgis.Critical)
        self.dock.trainFinished.emit(result)
