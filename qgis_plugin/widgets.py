"""Small widgets the dock's tabs share."""

from __future__ import annotations

from qgis.core import QgsMapLayer, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QComboBox, QListWidget, QListWidgetItem, QWidget

from .layers import raster_file
from .models import ModelInfo


def fill_model_combo(combo: QComboBox, models: list[ModelInfo], wanted: str | None = None) -> None:
    """List ``models`` in ``combo`` (label, key as data, summary as tooltip), selecting ``wanted`` (a key), else
    the one selected before, else the first; no signals while it is filled."""
    current = wanted or combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for model in models:
        combo.addItem(model.label(), model.key)
        combo.setItemData(combo.count() - 1, model.summary(), Qt.ToolTipRole)
    combo.setCurrentIndex(max(combo.findData(current), 0))
    combo.blockSignals(False)


class RasterList(QListWidget):
    """The project's raster layers, each checkable; non-file rasters are marked as rendered through QGIS. Its
    ``itemChanged`` fires when the user checks or unchecks one."""

    def __init__(self, tooltip: str, max_height: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setToolTip(tooltip)
        self.setMaximumHeight(max_height)

    def refresh(self) -> None:
        """List the project's raster layers again, keeping the checked ones checked (no ``itemChanged``)."""
        checked = {self.item(i).data(Qt.UserRole) for i in range(self.count())
                   if self.item(i).checkState() == Qt.Checked}
        self.blockSignals(True)
        self.clear()
        for layer in QgsProject.instance().mapLayers().values():
            if layer.type() != QgsMapLayer.RasterLayer:
                continue
            suffix = "" if raster_file(layer) else "  (rendered through QGIS)"
            item = QListWidgetItem(layer.name() + suffix, self)
            item.setData(Qt.UserRole, layer.id())
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if layer.id() in checked else Qt.Unchecked)
        self.blockSignals(False)

    def set_checked(self, layer_ids: list[str]) -> None:
        """Check exactly these layers."""
        for i in range(self.count()):
            item = self.item(i)
            item.setCheckState(Qt.Checked if item.data(Qt.UserRole) in layer_ids else Qt.Unchecked)

    def checked_layers(self) -> list[QgsRasterLayer]:
        """The checked layers still in the project, in list order."""
        layers = []
        for i in range(self.count()):
            item = self.item(i)
            if item.checkState() == Qt.Checked:
                layer = QgsProject.instance().mapLayer(item.data(Qt.UserRole))
                if isinstance(layer, QgsRasterLayer):
                    layers.append(layer)
        return layers
