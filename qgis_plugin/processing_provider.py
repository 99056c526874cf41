"""Processing provider ``delineate`` (toolbox group "Delineate"): ``delineate:segment``, ``delineate:finetune``."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import FinetuneAlgorithm, SegmentAlgorithm
from .settings import plugin_dir


class DelineateProvider(QgsProcessingProvider):
    """The plugin's Processing provider; registered by the plugin's ``initProcessing``."""

    def id(self) -> str:
        return "delineate"

    def name(self) -> str:
        return "Delineate"

    def longName(self) -> str:  # noqa: N802 (Qt's name)
        return "Delineate: instance segmentation of rasters"

    def icon(self) -> QIcon:
        return QIcon(str(plugin_dir() / "icon.svg"))

    def loadAlgorithms(self) -> None:  # noqa: N802
        self.addAlgorithm(SegmentAlgorithm())
        self.addAlgorithm(FinetuneAlgorithm())
