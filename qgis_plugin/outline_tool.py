"""The Outline map tool: click an object (a point prompt) or drag a box around it (a box prompt); the engine's
``rs-engine serve`` process (:class:`~.serve_client.ServeClient`) outlines it and the polygon is added at once to
the editable layer "Delineate outlines", one edit command per outline, so Ctrl+Z undoes it.

It works on the Segment tab's raster (the first checked raster, else the active raster layer), model and device.
A raster file goes to the engine by path; any other raster (XYZ, WMS, ...) is rendered around the prompt, one model
tile (``tile_size`` px at the model's GSD) into a temporary GeoTIFF, as the Segment tab renders such layers.
The engine process starts when the tool is switched on (it loads the model while the user aims) and ends with the
plugin, or when the model or the device changes. Requests are asynchronous: QGIS stays responsive while the
engine works, and clicks made meanwhile are queued by the engine.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, QVariant, pyqtSignal
from qgis.PyQt.QtGui import QColor

from .engine import log
from .layers import LayerError, raster_file, remove_file, render_pixel_size, safe_name, transform_extent
from .runs import Render, band_selection
from .serve_client import ServeClient, ServeError

if TYPE_CHECKING:
    from .dock_segment import SegmentTab
    from .settings import EngineCommand

OUTLINE_LAYER = "Delineate outlines"
#: custom property that marks the outline layer in a project (the user may rename it)
OUTLINE_PROPERTY = "delineate/outlines"
#: a press and release further apart than this (pixels) is a box, else a click
DRAG_PX = 5


def crs_text(crs: QgsCoordinateReferenceSystem) -> str | None:
    """A CRS as the engine takes it: its authority id (``EPSG:32616``), else its WKT; None when invalid (the
    raster's own frame, e.g. a raster without georeferencing)."""
    if not crs.isValid():
        return None
    return crs.authid() or crs.toWkt()


def outline_layer(crs: QgsCoordinateReferenceSystem, project: QgsProject | None = None) -> QgsVectorLayer:
    """The project's outline layer (marked with :data:`OUTLINE_PROPERTY`), else a new memory layer of that name in
    ``crs`` (MultiPolygon; fields ``prompt_id``, ``class_name``, ``score``, ``model``), styled and added."""
    project = project or QgsProject.instance()
    for layer in project.mapLayers().values():
        if isinstance(layer, QgsVectorLayer) and layer.customProperty(OUTLINE_PROPERTY):
            return layer
    layer = QgsVectorLayer("MultiPolygon", OUTLINE_LAYER, "memory")
    layer.setCrs(crs)  # an invalid one too: the memory provider would take EPSG:4326
    layer.dataProvider().addAttributes([QgsField("prompt_id", QVariant.Int), QgsField("class_name", QVariant.String),
                                        QgsField("score", QVariant.Double), QgsField("model", QVariant.String)])
    layer.updateFields()
    layer.setCustomProperty(OUTLINE_PROPERTY, True)
    layer.renderer().setSymbol(QgsFillSymbol.createSimple(
        {"color": "255,0,255,50", "outline_color": "255,0,255", "outline_width": "0.6"}))
    layer.setDisplayExpression("\"class_name\" || ' ' || format_number(\"score\", 2)")
    project.addMapLayer(layer)
    return layer


def add_outline(layer: QgsVectorLayer, geometry: QgsGeometry, attributes: dict[str, Any]) -> int | None:
    """Add one feature inside its own edit command (undoable), leaving the layer in edit mode; returns its
    (temporary) feature id, None when the layer refused it."""
    if not layer.isEditable() and not layer.startEditing():
        return None
    feature = QgsFeature(layer.fields())
    for name, value in attributes.items():
        if layer.fields().indexOf(name) >= 0:
            feature[name] = value
    feature.setGeometry(geometry)
    layer.beginEditCommand("Delineate outline")
    if not layer.addFeature(feature):
        layer.destroyEditCommand()
        return None
    layer.endEditCommand()
    layer.triggerRepaint()
    return feature.id()


def last_prompt_id(layer: QgsVectorLayer) -> int:
    """The largest ``prompt_id`` in the layer, unsaved edits included (0 for none)."""
    index = layer.fields().indexOf("prompt_id")
    if index < 0:
        return 0
    request = QgsFeatureRequest().setFlags(QgsFeatureRequest.NoGeometry).setSubsetOfAttributes([index])
    return max((f[index] for f in layer.getFeatures(request) if isinstance(f[index], int)), default=0)


def prompt_window(center: QgsPointXY, box: QgsRectangle | None, pixel_size: float, tile_size: int) -> QgsRectangle:
    """What to render around a prompt (map units of the raster): one tile of ``tile_size`` px centred on it,
    grown to hold the box with a quarter of its size as margin."""
    half = tile_size * pixel_size / 2
    window = QgsRectangle(center.x() - half, center.y() - half, center.x() + half, center.y() + half)
    if box is not None:
        window.combineExtentWith(box.buffered(max(box.width(), box.height()) / 4))
    return window


class OutlineTool(QgsMapTool):
    """The map tool, switched on and off by the Segment tab's checkable Outline button.

    ``outlined(dict)`` fires once per prompt when it is done: ``id``, ``fid`` (the added feature, None when nothing
    was added), ``seconds`` (mouse release to feature added), ``render_seconds``, and the engine's ``reply``.
    ``command`` (an :class:`~.settings.EngineCommand`) replaces the resolved engine command for new processes.
    """

    outlined = pyqtSignal(dict)

    def __init__(self, tab: SegmentTab) -> None:
        super().__init__(tab.dock.iface.mapCanvas())
        self.tab, self.dock = tab, tab.dock
        self.button = tab.outline_button
        self.command: EngineCommand | None = None
        self.client: ServeClient | None = None
        self._pending: dict[int, dict[str, Any]] = {}
        self._press: Any = None
        self._last_error = ""
        self._band: QgsRubberBand | None = None
        self.setCursor(Qt.CrossCursor)
        self.button.toggled.connect(self._on_toggled)
        tab.model_combo.currentIndexChanged.connect(self._on_engine_options)
        tab.device_combo.currentIndexChanged.connect(self._on_engine_options)

    # -- switching on and off ------------------------------------------------------------------------------
    def _on_toggled(self, checked: bool) -> None:
        canvas = self.canvas()
        if not checked:
            if canvas.mapTool() is self:
                canvas.unsetMapTool(self)
            return
        canvas.setMapTool(self)
        if self.raster() is None:
            self.dock.notify("Outline: check the raster layer to outline in the Segment tab", Qgis.Info, 5)
        try:
            self._client()  # load the model now: the first click then costs what any click does
        except ServeError as exc:
            self.dock.notify(f"Outline: {exc}", Qgis.Warning)

    def deactivate(self) -> None:
        """Another map tool took over: clear the rubber band, uncheck the button (the engine keeps running)."""
        self._clear_band()
        self.button.blockSignals(True)  # its handler would unset this tool while the canvas is switching
        self.button.setChecked(False)
        self.button.blockSignals(False)
        super().deactivate()

    def _on_engine_options(self, *_args: Any) -> None:
        """A new model or device: the running process serves the old one, so it ends (a new one starts on use)."""
        model = self.tab.selected_model()
        client = self.client
        if client is not None and (model is None or client.model != model.key
                                   or client.device != self.tab.device_combo.currentText()):
            self._stop_client()
            if self.button.isChecked() and model is not None:
                self._on_toggled(True)

    def shutdown(self) -> None:
        """Plugin unload: switch the tool off, end the engine process, delete the tool."""
        if self.canvas().mapTool() is self:
            self.canvas().unsetMapTool(self)
        self._clear_band()
        self._stop_client()
        self.deleteLater()

    def _client(self) -> ServeClient:
        """The serve process for the tab's model and device, started if needed. Raises ServeError."""
        model = self.tab.selected_model()
        if model is None:
            raise ServeError("no model: check the engine in the Settings tab")
        if self.client is None:
            self.client = ServeClient(model.key, self.tab.device_combo.currentText(), self, command=self.command)
            self.client.replied.connect(self._on_reply)
            self.client.stopped.connect(self._on_stopped)
        self.client.start()
        return self.client

    def _stop_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.stop()
            client.deleteLater()

    def _on_stopped(self, reason: str) -> None:
        if reason and reason != self._last_error:  # else a pending prompt has just reported it
            self.dock.notify(f"Outline: {reason}", Qgis.Warning)
        client = self.sender()
        if client is self.client:  # a crash: the next click starts a new process
            self.client = None
            client.deleteLater()

    # -- mouse ---------------------------------------------------------------------------------------------
    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 (QGIS's name)
        """Left button: start a click or a box."""
        if event.button() == Qt.LeftButton:
            self._press = (event.pos(), event.mapPoint())

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        """While dragging: draw the box."""
        if self._press is None or (event.pos() - self._press[0]).manhattanLength() <= DRAG_PX:
            return
        if self._band is None:
            self._band = QgsRubberBand(self.canvas(), QgsWkbTypes.PolygonGeometry)
            self._band.setColor(QColor(255, 0, 255, 60))
            self._band.setStrokeColor(QColor(255, 0, 255))
            self._band.setWidth(2)
        self._band.setToGeometry(QgsGeometry.fromRect(QgsRectangle(self._press[1], event.mapPoint())), None)

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        """Release: a box prompt when the mouse moved more than :data:`DRAG_PX`, else a point prompt."""
        if self._press is None or event.button() != Qt.LeftButton:
            return
        (pos, start), self._press = self._press, None
        self._clear_band()
        if (event.pos() - pos).manhattanLength() > DRAG_PX:
            self.prompt(box=QgsRectangle(start, event.mapPoint()))
        else:
            self.prompt(point=start)

    def keyPressEvent(self, event: Any) -> None:  # noqa: N802
        """Escape cancels a box being drawn."""
        if event.key() == Qt.Key_Escape:
            self._press = None
            self._clear_band()

    def _clear_band(self) -> None:
        if self._band is not None:
            self._band.reset(QgsWkbTypes.PolygonGeometry)
            self.canvas().scene().removeItem(self._band)
            self._band = None

    # -- prompts -------------------------------------------------------------------------------------------
    def raster(self) -> QgsRasterLayer | None:
        """The raster the tool works on: the Segment tab's first checked raster, else the active raster layer."""
        layers = self.tab.raster_list.checked_layers()
        active = self.dock.iface.activeLayer()
        return layers[0] if layers else active if isinstance(active, QgsRasterLayer) else None

    def prompt(self, point: QgsPointXY | None = None, box: QgsRectangle | None = None) -> int | None:
        """Send a point or box prompt given in map canvas coordinates; returns the request id (None when it could
        not be sent: the reason is in the message bar). The outline is added when the reply comes."""
        t0 = time.perf_counter()
        raster, model = self.raster(), self.tab.selected_model()
        if raster is None or model is None:
            self.dock.notify("Outline: check a raster layer and choose a model in the Segment tab" if model else
                             "Outline: no model (check the engine in the Settings tab)", Qgis.Warning)
            return None
        target = outline_layer(raster.crs())
        canvas_crs = self.canvas().mapSettings().destinationCrs()
        # a raster without georeferencing: prompts and polygons stay in its pixel frame (x = col, y = -row)
        crs = target.crs() if raster.crs().isValid() else QgsCoordinateReferenceSystem()
        request: dict[str, Any] = {"op": "prompt", "crs": crs_text(crs), "bands": None, "point": None, "box": None}
        if point is not None:
            p = self._to(point, canvas_crs, crs)
            request["point"] = [p.x(), p.y()]
        if box is not None:
            b = transform_extent(box, canvas_crs, crs)
            request["box"] = [b.xMinimum(), b.yMinimum(), b.xMaximum(), b.yMaximum()]
        context = {"layer_id": target.id(), "t0": t0, "render": None, "render_seconds": 0.0, "model": model.name}
        try:
            request["raster"] = raster_file(raster)
            if request["raster"] is None:  # a web or other non-file raster: render one tile around the prompt
                request["raster"] = context["render"] = self._render(raster, model, point, box, canvas_crs)
                request["bands"] = [int(b) for b in band_selection(raster.bandCount(), model.bands, True).split(",")]
                context["render_seconds"] = time.perf_counter() - t0
            request_id = self._client().send(request)
        except (LayerError, ServeError) as exc:
            if context["render"]:
                remove_file(context["render"])
            self.dock.notify(f"Outline: {exc}", Qgis.Warning)
            return None
        self._pending[request_id] = context
        self.setCursor(Qt.BusyCursor)
        return request_id

    @staticmethod
    def _to(point: QgsPointXY, source: QgsCoordinateReferenceSystem,
            dest: QgsCoordinateReferenceSystem) -> QgsPointXY:
        if not source.isValid() or not dest.isValid() or source == dest:
            return QgsPointXY(point)
        return QgsCoordinateTransform(source, dest, QgsProject.instance()).transform(point)

    def _render(self, raster: QgsRasterLayer, model: Any, point: QgsPointXY | None, box: QgsRectangle | None,
                canvas_crs: QgsCoordinateReferenceSystem) -> str:
        """One model tile of a non-file raster around the prompt, at the model's GSD, as a temporary GeoTIFF."""
        box_here = transform_extent(box, canvas_crs, raster.crs()) if box is not None else None
        center = box_here.center() if box_here is not None else self._to(point, canvas_crs, raster.crs())
        unit = QgsRectangle(center.x(), center.y(), center.x() + 1, center.y() + 1)
        window = prompt_window(center, box_here, render_pixel_size(raster, model.gsd, unit), model.tile_size)
        path = os.path.join(self.dock.temp_dir(), f"outline_{safe_name(raster.name())}_{uuid.uuid4().hex[:8]}.tif")
        return Render(raster, window, model.gsd, path).write()

    def _on_reply(self, reply: dict[str, Any]) -> None:
        context = self._pending.pop(reply.get("id"), None)
        if context is None:
            return
        if not self._pending:
            self.setCursor(Qt.CrossCursor)
        if context["render"]:
            remove_file(context["render"])
        fid = None
        layer = QgsProject.instance().mapLayer(context["layer_id"])
        if reply.get("event") == "error":
            self._last_error = str(reply.get("message", "engine error"))
            self.dock.notify(f"Outline: {self._last_error}", Qgis.Warning)
        elif not reply.get("wkt"):
            self.dock.notify("Outline: no object found here", Qgis.Info, 3)
        elif not isinstance(layer, QgsVectorLayer):
            self.dock.notify("Outline: the outline layer was removed meanwhile", Qgis.Warning)
        else:
            geometry = QgsGeometry.fromWkt(reply["wkt"])
            geometry.convertToMultiType()
            fid = add_outline(layer, geometry, {
                "prompt_id": last_prompt_id(layer) + 1,
                "class_name": reply.get("class_name"), "score": reply.get("score"),
                "model": reply.get("model") or context["model"]})
            if fid is None:
                self.dock.notify(f"Outline: could not add the polygon to {layer.name()}", Qgis.Warning)
        seconds = time.perf_counter() - context["t0"]
        if fid is not None:
            score = reply.get("score")
            self.dock.append_log(f"outline: {reply.get('class_name') or 'object'}"
                                 f"{f' {score:.2f}' if isinstance(score, (int, float)) else ''} in {seconds:.2f} s")
        log(f"outline request {reply.get('id')}: {reply.get('event')} in {seconds:.3f} s")
        self.outlined.emit({"id": reply.get("id"), "fid": fid, "seconds": seconds,
                            "render_seconds": context["render_seconds"], "reply": reply})
