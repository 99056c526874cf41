"""The dock's Segment tab: raster layers, model, extent and engine options; a click plans one run per checked
raster and hands them to a :class:`~.runs.RunQueue` (the one Processing uses too), which renders non-file
rasters, runs the engine and adds each result layer, named after the raster and the model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qgis.core import Qgis, QgsMapLayerProxyModel, QgsRasterLayer, QgsRectangle, QgsVectorLayer
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QWidget,
)

from .engine import EngineResult, log
from .layers import LayerError, raster_file, safe_name, transform_extent
from .models import ModelInfo
from .outline_tool import OutlineTool
from .runs import DEVICES, WARNING, RunQueue, SegmentOptions, band_selection, plan_run
from .widgets import RasterList, fill_model_combo

if TYPE_CHECKING:
    from .dock import DelineateDock

EXTENT_LAYER, EXTENT_CANVAS, EXTENT_SELECTION = range(3)


class SegmentTab(QWidget):
    """Segment rasters with a model. ``queue`` is its :class:`~.runs.RunQueue`; the dock's ``runFinished`` fires
    after the last raster of a click (or the first failure)."""

    def __init__(self, dock: DelineateDock) -> None:
        super().__init__(dock)
        self.dock = dock
        self.select_after_refresh: str | None = None
        self.queue = RunQueue(self)
        self.queue.message.connect(self._on_message)
        self.queue.progressChanged.connect(lambda value: dock.progress.setValue(int(value)))
        self.queue.finished.connect(self._on_finished)
        self._build()
        self.outline_tool = OutlineTool(self)
        dock.catalog.changed.connect(self._on_models)

    def _build(self) -> None:
        form = QFormLayout(self)
        self.raster_list = RasterList("Raster layers to segment (each gives its own result layer)", 110, self)
        self.raster_list.itemChanged.connect(lambda _item: self.prefill_bands())
        form.addRow("Rasters", self.raster_list)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox(self)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        model_row.addWidget(self.model_combo, 1)
        self.add_model_button = QToolButton(self)
        self.add_model_button.setText("+")
        self.add_model_button.setToolTip("Add a model file (.safetensors)")
        self.add_model_button.clicked.connect(self._add_model_file)
        model_row.addWidget(self.add_model_button)
        self.refresh_models_button = QToolButton(self)
        self.refresh_models_button.setText("↻")
        self.refresh_models_button.setToolTip("Ask the engine for the model list again")
        self.refresh_models_button.clicked.connect(lambda: self.dock.catalog.refresh())
        model_row.addWidget(self.refresh_models_button)
        self.outline_button = QPushButton("Outline", self)
        self.outline_button.setCheckable(True)
        self.outline_button.setToolTip("Map tool: click an object, or drag a box around it, to outline it with this "
                                       "model on the first checked raster; polygons go to 'Delineate outlines'")
        model_row.addWidget(self.outline_button)
        form.addRow("Model", model_row)
        self.model_info = QLabel("asking the engine for its models...", self)
        self.model_info.setWordWrap(True)
        self.model_info.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.MinimumExpanding)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow("", self.model_info)

        extent_row = QHBoxLayout()
        self.extent_combo = QComboBox(self)
        self.extent_combo.addItems(["Whole layer", "Map canvas", "Selected features of"])
        extent_row.addWidget(self.extent_combo)
        self.extent_layer_combo = QgsMapLayerComboBox(self)
        self.extent_layer_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.extent_layer_combo.setEnabled(False)
        self.extent_combo.currentIndexChanged.connect(
            lambda i: self.extent_layer_combo.setEnabled(i == EXTENT_SELECTION))
        extent_row.addWidget(self.extent_layer_combo, 1)
        form.addRow("Extent", extent_row)

        self.tile_spin = QSpinBox(self)
        self.tile_spin.setRange(32, 8192)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setSuffix(" px")
        form.addRow("Tile size", self.tile_spin)
        self.overlap_spin = QSpinBox(self)
        self.overlap_spin.setRange(0, 4096)
        self.overlap_spin.setSingleStep(16)
        self.overlap_spin.setSuffix(" px")
        form.addRow("Overlap", self.overlap_spin)
        self.score_spin = QDoubleSpinBox(self)
        self.score_spin.setRange(0.0, 1.0)
        self.score_spin.setSingleStep(0.05)
        self.score_spin.setDecimals(2)
        form.addRow("Score threshold", self.score_spin)
        self.bands_edit = QLineEdit(self)
        self.bands_edit.setPlaceholderText("model default (first bands)")
        self.bands_edit.setToolTip("1-based bands, comma-separated; repeats allowed (1,1,1: one band to an RGB "
                                   "model). Empty: the model's first bands; band 1 repeated for a 1-band raster "
                                   "and a model that takes more (the log says so)")
        form.addRow("Bands", self.bands_edit)
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(DEVICES)
        form.addRow("Device", self.device_combo)
        self.output_widget = QgsFileWidget(self)
        self.output_widget.setStorageMode(QgsFileWidget.SaveFile)
        self.output_widget.setFilter("GeoPackage (*.gpkg)")
        self.output_widget.lineEdit().setPlaceholderText("[temporary file]")
        self.output_widget.setToolTip("Empty: a temporary GeoPackage per raster")
        form.addRow("Output", self.output_widget)

        buttons = QHBoxLayout()
        self.segment_button = QPushButton("Segment", self)
        self.segment_button.clicked.connect(self.start_segment)
        buttons.addWidget(self.segment_button)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.clicked.connect(self.dock.cancel)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)

    # -- state ---------------------------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.segment_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def is_busy(self) -> bool:
        return self.queue.is_busy()

    def cancel(self) -> None:
        self.queue.cancel()

    def shutdown(self) -> None:
        self.queue.shutdown()
        self.outline_tool.shutdown()

    # -- models --------------------------------------------------------------------------------------------
    def selected_model(self) -> ModelInfo | None:
        """The model chosen here."""
        key = self.model_combo.currentData()
        return self.dock.catalog.find(key) if key else None

    def select_model(self, key: str) -> None:
        """Choose a model by key (bundled name or path)."""
        index = self.model_combo.findData(key)
        if index >= 0:
            self.model_combo.setCurrentIndex(index)

    def _on_models(self) -> None:
        fill_model_combo(self.model_combo, self.dock.catalog.models, self.select_after_refresh)
        self.select_after_refresh = None
        self._on_model_changed()

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
        self.prefill_bands()

    def prefill_bands(self) -> None:
        """Bands for the first checked raster and the model (see :func:`~.runs.band_selection`)."""
        model = self.selected_model()
        layers = self.raster_list.checked_layers()
        if model is not None and layers:
            layer = layers[0]
            self.bands_edit.setText(band_selection(layer.bandCount(), model.bands,
                                                   rendered=raster_file(layer) is None))

    def _add_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a Delineate model", "", "Delineate model (*.safetensors)")
        if path:
            self.dock.register_model(path)

    # -- segment -------------------------------------------------------------------------------------------
    def _extent_for(self, layer: QgsRasterLayer) -> QgsRectangle | None:
        """The chosen extent in the raster's CRS (None: the whole raster; a web layer's whole extent is the
        world, so it gets the map canvas). Raises LayerError."""
        mode = self.extent_combo.currentIndex()
        if mode == EXTENT_LAYER and raster_file(layer):
            return None
        if mode in (EXTENT_LAYER, EXTENT_CANVAS):
            canvas = self.dock.iface.mapCanvas()
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

    def _output_for(self, layer: QgsRasterLayer, model: ModelInfo, index: int, count: int, stamp: int) -> str:
        chosen = self.output_widget.filePath().strip()
        if not chosen:
            return os.path.join(self.dock.temp_dir(),
                                f"{safe_name(layer.name())}_{safe_name(model.name)}_{stamp}_{index}.gpkg")
        output = chosen if count == 1 else str(
            Path(chosen).with_name(f"{Path(chosen).stem}_{safe_name(layer.name())}.gpkg"))
        return output if output.lower().endswith(".gpkg") else output + ".gpkg"

    def start_segment(self) -> None:
        """Segment click: plan one run per checked raster (else the active raster layer), then start them."""
        if self.dock.is_busy():
            return
        model = self.selected_model()
        if model is None:
            self.dock.notify("no model: check the engine in the Settings tab", Qgis.Warning)
            return
        iface = self.dock.iface
        layers = self.raster_list.checked_layers()
        if not layers and isinstance(iface.activeLayer(), QgsRasterLayer):
            layers = [iface.activeLayer()]
        if not layers:
            self.dock.notify("check the raster layer(s) to segment", Qgis.Warning)
            return
        options = SegmentOptions.for_key(model.key, tile_size=self.tile_spin.value(),
                                         overlap=self.overlap_spin.value(), score_threshold=self.score_spin.value(),
                                         device=self.device_combo.currentText()).with_card(model)
        temporary = not self.output_widget.filePath().strip()
        stamp = int(time.time() * 1000)
        try:  # the bands field was filled in for the first raster; the others get the model's default
            runs = [plan_run(layer, options, self._output_for(layer, model, i, len(layers), stamp),
                             render_dir=self.dock.temp_dir(), extent=self._extent_for(layer),
                             bands=self.bands_edit.text() if i == 0 else "", temporary_output=temporary)
                    for i, layer in enumerate(layers)]
        except LayerError as exc:
            self.dock.notify(str(exc), Qgis.Warning)
            return
        self.dock.progress.setValue(0)
        self.dock.set_running(True)
        self.dock.append_log(f"segment {len(runs)} raster(s) with {model.name}")
        self.queue.start(runs, options)

    def _on_message(self, text: str, kind: str) -> None:
        if kind == WARNING:
            self.dock.append_log(f"warning: {text}")
            log(text, Qgis.Warning)
        else:
            self.dock.append_log(text)

    def _on_finished(self, result: EngineResult) -> None:
        done = self.queue.done
        if result.ok:
            self.dock.progress.setValue(100)
            total = sum(int(r.result.done.get("features", 0)) for r in done if r.result)
            self.dock.notify(f"{len(done)} layer(s) added, {total} instances", Qgis.Success, 5)
        elif result.cancelled:
            self.dock.progress.setValue(0)
            self.dock.notify("segmentation cancelled", Qgis.Info, 4)
        else:
            self.dock.progress.setValue(0)
            self.dock.notify(result.message, Qgis.Critical)
        self.dock.set_running(False)
        self.dock.runFinished.emit(result)
