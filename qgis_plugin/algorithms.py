"""Processing algorithms ``delineate:segment`` and ``delineate:finetune``: the engine's commands as Processing
tools (toolbox, batch mode, Model Builder, ``qgis_process``). ``delineate:segment`` plans and runs its raster with
the dock's own :mod:`.runs` (the same rendering of web layers at the model's GSD, bands, command and engine runner),
blocking in the algorithm's thread; Cancel ends the engine process; engine errors become
``QgsProcessingException`` with the engine's one-line message; engine warnings become feedback warnings."""

from __future__ import annotations

import os
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication

from .commands import describe_epoch, finetune_args, finetune_percent
from .engine import EngineJob, EngineResult
from .layers import LayerError, raster_file, result_layer_name, style_result_layer
from .models import ModelError, describe_model
from .runs import (
    COMMAND,
    DEVICES,
    RunQueue,
    SegmentOptions,
    engine_line,
    needs_model_card,
    plan_run,
    relay_to,
)
from .settings import add_user_model


def _tr(text: str) -> str:
    return QCoreApplication.translate("Delineate", text)


def _optional(parameters: dict[str, Any], name: str) -> Any:
    """The raw value of an optional parameter, None when unset or empty."""
    value = parameters.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


def _advanced(param: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def _train(args: list[str], feedback: QgsProcessingFeedback) -> EngineResult:
    """Run ``rs-train`` with ``args`` to its end in this thread, relaying progress, epochs and output lines."""
    job = EngineJob("rs-train", args)
    relay = relay_to(feedback)

    def on_event(event: dict) -> None:
        if event.get("event") == "progress":
            value = finetune_percent(event)
            if value is not None:
                feedback.setProgress(value)
        elif event.get("event") == "epoch":
            feedback.pushInfo(describe_epoch(event))

    job.engineEvent.connect(on_event)
    job.logLine.connect(lambda line: relay(*engine_line(line)))
    relay(" ".join([job.tool, *job.args]), COMMAND)
    if job.start():
        job.wait(feedback)
    result = job.result
    if result.cancelled:
        raise QgsProcessingException(_tr("Cancelled"))
    if not result.ok:
        raise QgsProcessingException(result.message)
    return result


class ResultStyler(QgsProcessingLayerPostProcessorInterface):
    """Styles a segment output when Processing loads it (categorised by class)."""

    instance: ResultStyler | None = None

    def postProcessLayer(self, layer: Any, context: QgsProcessingContext,  # noqa: N802 (Qt's name)
                         feedback: QgsProcessingFeedback) -> None:
        if isinstance(layer, QgsVectorLayer):
            style_result_layer(layer)

    @staticmethod
    def create() -> ResultStyler:
        # Processing keeps only a raw pointer: keep the Python object alive
        ResultStyler.instance = ResultStyler()
        return ResultStyler.instance


class SegmentAlgorithm(QgsProcessingAlgorithm):
    """``delineate:segment``: ``rs-engine segment`` on one raster layer into a GeoPackage of instance polygons."""

    INPUT, MODEL, OUTPUT = "INPUT", "MODEL", "OUTPUT"
    TILE_SIZE, OVERLAP, SCORE_THRESHOLD, BANDS, DEVICE, EXTENT = (
        "TILE_SIZE", "OVERLAP", "SCORE_THRESHOLD", "BANDS", "DEVICE", "EXTENT")

    def name(self) -> str:
        return "segment"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Segment objects in a raster")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Finds and outlines objects (instances) in a raster with a Delineate model, in a separate engine "
                   "process (rs-engine segment). Output: GeoPackage layer 'instances' in the raster's CRS with "
                   "class_id, class_name, score, area, source, model, run_id. Empty options take the model card's "
                   "values. MODEL: a bundled model name (nwpu10, ssdd-ship) or a .safetensors file path. BANDS: "
                   "1-based, comma-separated, repeats allowed (1,1,1 feeds one band to an RGB model). Non-file "
                   "rasters (XYZ, WMS) are rendered to a temporary GeoTIFF first (give an EXTENT).")

    def createInstance(self) -> SegmentAlgorithm:  # noqa: N802
        return SegmentAlgorithm()

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, _tr("Raster layer")))
        self.addParameter(QgsProcessingParameterString(self.MODEL, _tr("Model (bundled name or file path)"),
                                                       defaultValue="nwpu10"))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, _tr("Extent (default: whole raster)"),
                                                       optional=True))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.TILE_SIZE, _tr("Tile size (px; default: model card)"), QgsProcessingParameterNumber.Integer,
            optional=True, minValue=32)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.OVERLAP, _tr("Tile overlap (px; default: model card)"), QgsProcessingParameterNumber.Integer,
            optional=True, minValue=0)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.SCORE_THRESHOLD, _tr("Score threshold (0-1; default: model card)"),
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0, maxValue=1.0)))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.BANDS, _tr("Bands (e.g. 1,2,3; default: the first bands the model takes)"), optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterEnum(self.DEVICE, _tr("Device"), options=DEVICES,
                                                               defaultValue=0)))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, _tr("Instances (GeoPackage)"), QgsProcessing.TypeVectorPolygon))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, self.INPUT))
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if not output.lower().endswith(".gpkg"):
            raise QgsProcessingException(_tr(f"OUTPUT must be a GeoPackage (.gpkg), not {output}"))
        extent = None
        if _optional(parameters, self.EXTENT) is not None:
            rect = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            if not rect.isEmpty():
                extent = rect

        def opt(name: str, as_type: Any) -> Any:
            return as_type(parameters, name, context) if _optional(parameters, name) is not None else None

        options = SegmentOptions.for_key(
            (self.parameterAsString(parameters, self.MODEL, context) or "nwpu10").strip(),
            tile_size=opt(self.TILE_SIZE, self.parameterAsInt), overlap=opt(self.OVERLAP, self.parameterAsInt),
            score_threshold=opt(self.SCORE_THRESHOLD, self.parameterAsDouble),
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)])
        try:
            if needs_model_card(layer):
                options = options.with_card(describe_model(options.model, feedback))
            run = plan_run(layer, options, output, render_dir=QgsProcessingUtils.tempFolder(), extent=extent,
                           bands=self.parameterAsString(parameters, self.BANDS, context) or "")
        except (ModelError, LayerError) as exc:
            raise QgsProcessingException(str(exc)) from exc
        queue = RunQueue(add_layers=False)  # direct calls: the feedback may live in another thread
        queue.message.connect(relay_to(feedback))
        queue.progressChanged.connect(lambda value: feedback.setProgress(value))
        result = queue.run_blocking([run], options, feedback)
        if result.cancelled:
            raise QgsProcessingException(_tr("Cancelled"))
        if not result.ok:
            raise QgsProcessingException(result.message)
        if context.willLoadLayerOnCompletion(output):
            details = context.layerToLoadOnCompletionDetails(output)
            details.name = result_layer_name(layer.name(), options.model_name)
            details.setPostProcessor(ResultStyler.create())
        return {self.OUTPUT: output}


class FinetuneAlgorithm(QgsProcessingAlgorithm):
    """``delineate:finetune``: ``rs-train finetune`` on raster(s) + a polygon layer; registers the new model."""

    RASTER, LABELS, CLASS_FIELD, AOI, BASE_MODEL, EPOCHS, OUTPUT_MODEL = (
        "RASTER", "LABELS", "CLASS_FIELD", "AOI", "BASE_MODEL", "EPOCHS", "OUTPUT_MODEL")
    BANDS, DEVICE, CHIP_SIZE, CHIPS_PER_EPOCH, BATCH_SIZE, MAX_MINUTES, EXTRA_ARGS = (
        "BANDS", "DEVICE", "CHIP_SIZE", "CHIPS_PER_EPOCH", "BATCH_SIZE", "MAX_MINUTES", "EXTRA_ARGS")

    def name(self) -> str:
        return "finetune"

    def displayName(self) -> str:  # noqa: N802
        return _tr("Fine-tune a model on your polygons")

    def shortHelpString(self) -> str:  # noqa: N802
        return _tr("Fine-tunes a Delineate model on raster(s) and a polygon layer of your own annotations, in a "
                   "separate process (rs-train finetune). Every object inside the annotated area (AOI, default: "
                   "around the labels) must be outlined. The new model file is added to the plugin's model list. "
                   "A cancelled run keeps a checkpoint; running the same command again resumes it.")

    def createInstance(self) -> FinetuneAlgorithm:  # noqa: N802
        return FinetuneAlgorithm()

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers(self.RASTER, _tr("Raster layer(s)"),
                                                               QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABELS, _tr("Annotated polygons"),
                                                              [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, _tr("Class field"),
                                                      parentLayerParameterName=self.LABELS))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AOI, _tr("Annotated area (AOI)"), [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterString(self.BASE_MODEL, _tr("Base model (bundled name or path)"),
                                                       defaultValue="nwpu10"))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, _tr("Epochs"),
                                                       QgsProcessingParameterNumber.Integer, 20, minValue=1))
        self.addParameter(_advanced(QgsProcessingParameterString(self.BANDS, _tr("Bands (e.g. 1,2,3)"),
                                                                 optional=True)))
        self.addParameter(_advanced(QgsProcessingParameterEnum(self.DEVICE, _tr("Device"), options=DEVICES,
                                                               defaultValue=0)))
        for name, label in ((self.CHIP_SIZE, "Chip size (px; default: base model's tile)"),
                            (self.CHIPS_PER_EPOCH, "Chips per epoch (default: from the annotated area)"),
                            (self.BATCH_SIZE, "Batch size (chips per step)")):
            self.addParameter(_advanced(QgsProcessingParameterNumber(
                name, _tr(label), QgsProcessingParameterNumber.Integer, optional=True, minValue=1)))
        self.addParameter(_advanced(QgsProcessingParameterNumber(
            self.MAX_MINUTES, _tr("Stop after (minutes; run again to continue)"),
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.1)))
        self.addParameter(_advanced(QgsProcessingParameterString(
            self.EXTRA_ARGS, _tr("Extra rs-train finetune arguments"), optional=True)))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_MODEL, _tr("Fine-tuned model"), _tr("Delineate model (*.safetensors)")))
        self.addOutput(QgsProcessingOutputNumber("MASK_AP", _tr("Validation mask AP")))
        self.addOutput(QgsProcessingOutputNumber("BOX_AP", _tr("Validation box AP")))

    def processAlgorithm(self, parameters: dict[str, Any], context: QgsProcessingContext,  # noqa: N802
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        rasters = []
        for layer in self.parameterAsLayerList(parameters, self.RASTER, context):
            path = raster_file(layer)
            if path is None:
                raise QgsProcessingException(_tr(f"RASTER: {layer.name()} is not a raster file GDAL reads "
                                                 "(export web layers with Raster > Conversion > Translate first)"))
            rasters.append(path)
        if not rasters:
            raise QgsProcessingException(_tr("RASTER: no raster layer given"))
        labels = self.parameterAsCompatibleSourceLayerPath(parameters, self.LABELS, context, ["gpkg", "geojson", "shp"],
                                                           "gpkg", feedback)
        aoi = None
        if _optional(parameters, self.AOI) is not None:
            aoi = self.parameterAsCompatibleSourceLayerPath(parameters, self.AOI, context,
                                                            ["gpkg", "geojson", "shp"], "gpkg", feedback)
        output = self.parameterAsFileOutput(parameters, self.OUTPUT_MODEL, context)
        if not output.lower().endswith(".safetensors"):
            output += ".safetensors"
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

        def opt_int(name: str) -> int | None:
            return self.parameterAsInt(parameters, name, context) if _optional(parameters, name) is not None \
                else None

        args = finetune_args(
            rasters, labels, self.parameterAsString(parameters, self.CLASS_FIELD, context),
            (self.parameterAsString(parameters, self.BASE_MODEL, context) or "nwpu10").strip(), output,
            epochs=self.parameterAsInt(parameters, self.EPOCHS, context), aoi=aoi,
            bands=self.parameterAsString(parameters, self.BANDS, context) or "",
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            chip_size=opt_int(self.CHIP_SIZE), chips_per_epoch=opt_int(self.CHIPS_PER_EPOCH),
            batch_size=opt_int(self.BATCH_SIZE),
            max_minutes=(self.parameterAsDouble(parameters, self.MAX_MINUTES, context)
                         if _optional(parameters, self.MAX_MINUTES) is not None else None),
            extra_args=self.parameterAsString(parameters, self.EXTRA_ARGS, context) or "")
        result = _train(args, feedback)
        model = str(result.done.get("output") or output)
        add_user_model(model)
        metrics = result.done.get("metrics") or {}
        mask_ap = (metrics.get("segm") or {}).get("AP")
        box_ap = (metrics.get("bbox") or {}).get("AP")
        feedback.pushInfo(_tr(f"model written to {model} (validation mask AP {mask_ap}, box AP {box_ap}); "
                              "added to the Delineate model list"))
        return {self.OUTPUT_MODEL: model, "MASK_AP": mask_ap, "BOX_AP": box_ap}
