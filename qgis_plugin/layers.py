"""Layers in and out of the engine: which rasters the engine can read directly, the render pipe and writer for the
others (XYZ, WMS, ...; :mod:`.runs` decides when and at what resolution), writing edited vector layers to a
GeoPackage, and loading + styling the engine's results."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeedback,
    QgsFillSymbol,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterBlockFeedback,
    QgsRasterFileWriter,
    QgsRasterInterface,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsRendererCategory,
    QgsUnitTypes,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from .engine import log

RESULT_LAYER = "instances"
#: distinct, colour-blind friendly (Okabe-Ito, then Tableau 10) colours for the classes
PALETTE = ("#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#000000",
           "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")
#: rendered rasters larger than this (pixels per side) are refused: pick a smaller extent
MAX_RENDER_SIDE = 20000


class LayerError(ValueError):
    """A layer the engine can't take, with a message for the user."""


def safe_name(text: str) -> str:
    """A file-name-safe version of a layer or model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "layer"


def remove_file(path: str) -> None:
    """Remove a file the plugin wrote (and its ``.aux.xml``) if it exists; a failure is logged, not raised."""
    for candidate in (path, path + ".aux.xml"):
        if os.path.exists(candidate):
            try:
                os.remove(candidate)
            except OSError as exc:
                log(f"could not remove {candidate}: {exc}", Qgis.Warning)


# -- rasters ---------------------------------------------------------------------------------------------------
def raster_file(layer: QgsRasterLayer) -> str | None:
    """The local file behind a raster layer GDAL reads, or None (web and other non-file rasters)."""
    if layer is None or layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    return path if path and os.path.isfile(path) else None


def metres_to_map_units(metres: float, crs: QgsCoordinateReferenceSystem) -> float:
    """A distance in metres in ``crs`` units (degrees: at the equator, good enough for a render resolution)."""
    units = crs.mapUnits()
    if units == QgsUnitTypes.DistanceDegrees:
        return metres / 111_320.0
    return metres * QgsUnitTypes.fromUnitToUnitFactor(QgsUnitTypes.DistanceMeters, units)


def render_pipe(layer: QgsRasterLayer) -> QgsRasterPipe:
    """A pipe that draws ``layer`` as QGIS does (a clone of its provider + its renderer: RGBA output). Build it in
    the main thread; :func:`write_pipe` may then run in a background thread.

    Raises:
        LayerError: the layer can't be rendered.
    """
    pipe = QgsRasterPipe()
    if not pipe.set(layer.dataProvider().clone()) or not pipe.set(layer.renderer().clone()):
        raise LayerError(f"{layer.name()}: cannot render this layer")
    return pipe


def write_pipe(pipe: QgsRasterPipe, crs: QgsCoordinateReferenceSystem, extent: QgsRectangle, pixel_size: float,
               path: str, feedback: QgsFeedback | None = None, name: str = "raster") -> str:
    """Write ``extent`` (in ``crs``) of a render pipe into a GeoTIFF at exactly ``pixel_size`` map units per pixel
    (the extent grows right and down to whole pixels).

    Raises:
        LayerError: empty extent, too many pixels, or the writer failed.
    """
    if extent.isEmpty() or pixel_size <= 0:
        raise LayerError(f"{name}: nothing to render (empty extent)")
    cols, rows = math.ceil(extent.width() / pixel_size), math.ceil(extent.height() / pixel_size)
    if max(cols, rows) > MAX_RENDER_SIDE:
        raise LayerError(f"{name}: rendering {cols} x {rows} px at {pixel_size:g} map units/px is too "
                         "large; choose the map canvas or selected features as extent")
    extent = QgsRectangle(extent.xMinimum(), extent.yMaximum() - rows * pixel_size,
                          extent.xMinimum() + cols * pixel_size, extent.yMaximum())
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    block_feedback = QgsRasterBlockFeedback()  # the writer takes only this kind: relay cancel and progress
    if feedback is not None:
        if feedback.isCanceled():
            block_feedback.cancel()
        feedback.canceled.connect(block_feedback.cancel)
        block_feedback.progressChanged.connect(feedback.setProgress)
    error = writer.writeRaster(pipe, cols, rows, extent, crs, QgsProject.instance().transformContext(),
                               block_feedback)
    if error != QgsRasterFileWriter.NoError:
        raise LayerError(f"{name}: rendering to {path} failed (QgsRasterFileWriter error {int(error)})")
    return path


def render_pixel_size(layer: QgsRasterLayer, model_gsd: float | None, extent: QgsRectangle) -> float:
    """Map units per pixel to render a non-file raster at: the model's GSD, else the layer's own resolution when
    it has one, else 0.5 m, but never more than :data:`MAX_RENDER_SIDE` pixels across ``extent``."""
    if model_gsd:
        size = metres_to_map_units(model_gsd, layer.crs())
    elif layer.dataProvider().capabilities() & QgsRasterInterface.Size and layer.rasterUnitsPerPixelX() > 0:
        size = layer.rasterUnitsPerPixelX()
    else:
        size = metres_to_map_units(0.5, layer.crs())
    return max(size, max(extent.width(), extent.height()) / MAX_RENDER_SIDE)


def transform_extent(extent: QgsRectangle, source: QgsCoordinateReferenceSystem,
                     dest: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """``extent`` from one CRS to another (bounding box of the densified edges)."""
    if not source.isValid() or not dest.isValid() or source == dest:
        return QgsRectangle(extent)
    transform = QgsCoordinateTransform(source, dest, QgsProject.instance())
    return transform.transformBoundingBox(extent)


# -- vector layers ---------------------------------------------------------------------------------------------
def vector_file(layer: QgsVectorLayer, folder: str) -> str:
    """A file the engine can read holding ``layer``: its own file when it is a plain saved OGR file layer (one
    layer, no filter, no unsaved edits), else a copy written to ``folder/NAME.gpkg``.

    Raises:
        LayerError: the copy failed.
    """
    if layer.providerType() == "ogr" and not layer.isModified() and not layer.subsetString():
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path", "")
        if path and os.path.isfile(path) and not parts.get("layerName") and not parts.get("layerId"):
            return path
    os.makedirs(folder, exist_ok=True)
    safe = safe_name(layer.name())
    out = str(Path(folder) / f"{safe}.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = safe
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, out, QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        raise LayerError(f"{layer.name()}: could not write it to {out}: {message}")
    return out


# -- results ---------------------------------------------------------------------------------------------------
def result_layer_name(raster_name: str, model_name: str) -> str:
    """Name of a result layer in the project: ``<raster> - <model>``."""
    return f"{raster_name} - {model_name}"


def load_result_layer(path: str, name: str) -> QgsVectorLayer:
    """The ``instances`` layer of an engine output GeoPackage, styled (not yet added to a project).

    Raises:
        LayerError: the file has no readable ``instances`` layer.
    """
    layer = QgsVectorLayer(f"{path}|layername={RESULT_LAYER}", name, "ogr")
    if not layer.isValid():
        raise LayerError(f"{path}: no readable '{RESULT_LAYER}' layer")
    style_result_layer(layer)
    return layer


def style_result_layer(layer: QgsVectorLayer, class_names: list[str] | None = None) -> None:
    """Categorise by ``class_name`` with distinct colours (semi-transparent fill, solid outline); score in the
    display expression and map tips; fields aliased for identify and the attribute table."""
    field_index = layer.fields().indexOf("class_name")
    if field_index < 0:
        return
    names = sorted({str(v) for v in layer.uniqueValues(field_index) if v is not None} | set(class_names or []))
    categories = []
    for i, name in enumerate(names):
        color = QColor(PALETTE[i % len(PALETTE)])
        symbol = QgsFillSymbol.createSimple({
            "color": f"{color.red()},{color.green()},{color.blue()},70",
            "outline_color": color.name(),
            "outline_width": "0.6",
        })
        categories.append(QgsRendererCategory(name, symbol, name))
    layer.setRenderer(QgsCategorizedSymbolRenderer("class_name", categories))
    aliases = {"class_id": "Class id", "class_name": "Class", "score": "Score (0-1)", "area": "Area (CRS units²)",
               "source": "Source raster", "model": "Model", "run_id": "Run"}
    for field_name, alias in aliases.items():
        idx = layer.fields().indexOf(field_name)
        if idx >= 0:
            layer.setFieldAlias(idx, alias)
    layer.setDisplayExpression("\"class_name\" || ' ' || format_number(\"score\", 2)")
    layer.setMapTipTemplate("[% \"class_name\" %] score [% format_number(\"score\", 2) %]")
    layer.triggerRepaint()


def add_result_layer(path: str, name: str, project: QgsProject | None = None) -> QgsVectorLayer:
    """Load, style and add a result layer to the project (top of the layer tree); returns it."""
    layer = load_result_layer(path, name)
    (project or QgsProject.instance()).addMapLayer(layer)
    return layer

