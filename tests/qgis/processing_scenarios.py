"""Processing scenarios, headless (no iface, like qgis_process): ``python3 processing_scenarios.py SCENARIO WORKDIR``.

segment:  processing.run("delineate:segment") on a georeferenced SAR raster (the SSDD example put in UTM) -> GeoPackage
          layer `instances` in its CRS, with the ships found;
          a missing model -> QgsProcessingException carrying the engine's message.
finetune: processing.run("delineate:finetune") on the SpaceNet sample (1 short epoch) -> a model file, registered
          in the settings, which delineate:segment then runs with.
web:      delineate:segment on an XYZ layer (local tiles) with a 1-band model whose card says 2 m/px
          (WORKDIR/ssdd-ship-2m.safetensors, written by the test): the render must be at 2 m/px and the engine get
          one band; the rendered GeoTIFF is inspected when its command is pushed, and must be gone afterwards.
pan:      delineate:segment on the SpaceNet panchromatic raster (1 band) with the default optical model nwpu10
          (3 bands), no BANDS: finishes with a layer, and the band-1-repeated notice is in the feedback.
batch:    Processing's batch dialog (BatchAlgorithmDialog, as the toolbox's "Execute as Batch Process") runs
          delineate:segment over two raster layers, loading the results into the project.
model:    a Processing model (QgsProcessingModelAlgorithm, as Model Builder saves it: written to a .model3 file and
          read back) chaining delineate:segment and native:pointonsurface, run headless.
Prints one JSON line of facts (last line of stdout).
"""

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, init_processing, local_xyz_layer, report, sar_example_in_utm, spacenet_middle  # noqa: E402
from qgis.core import (  # noqa: E402
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingUtils,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

import qgis_plugin  # noqa: E402

SCENARIO, WORK = sys.argv[1], sys.argv[2]
SPACENET = str(ROOT / "examples" / "spacenet_atlanta.tif")
DATA = ROOT.parent / "shared" / "data" / "spacenet_samples"

if SCENARIO == "batch":  # Processing's dialogs need an iface before they are imported
    import qgis.utils
    from harness import FakeIface

    qgis.utils.iface = FakeIface()

init_processing()
plugin = qgis_plugin.classFactory(None)
plugin.initProcessing()  # what QGIS and qgis_process do for hasProcessingProvider=yes

import processing  # noqa: E402


class Feedback(QgsProcessingFeedback):
    """Keeps the progress values and the info, warning, command and console lines; on each engine command whose
    input is a GeoTIFF, notes that raster's band count and pixel size (a rendered raster exists only then)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []
        self.infos: list[str] = []
        self.warnings: list[str] = []
        self.commands: list[str] = []
        self.console: list[str] = []
        self.inputs: list[dict] = []
        self.progressChanged.connect(self.values.append)

    def pushInfo(self, info: str) -> None:  # noqa: N802
        self.infos.append(info)

    def pushWarning(self, warning: str) -> None:  # noqa: N802
        self.warnings.append(warning)

    def pushConsoleInfo(self, info: str) -> None:  # noqa: N802
        self.console.append(info)

    def pushCommandInfo(self, info: str) -> None:  # noqa: N802
        self.commands.append(info)
        words = info.split()
        if "segment" in words and words[words.index("segment") + 1].endswith(".tif"):
            from osgeo import gdal

            path = words[words.index("segment") + 1]
            ds = gdal.Open(path)
            if ds is not None:
                gt = ds.GetGeoTransform()
                self.inputs.append({"path": path, "bands": ds.RasterCount, "pixel": [gt[1], -gt[5]],
                                    "crs": ds.GetSpatialRef().GetAuthorityCode(None) if ds.GetSpatialRef() else None})


def describe(path: str) -> dict:
    layer = QgsVectorLayer(f"{path}|layername=instances", "instances", "ogr")
    return {"valid": layer.isValid(), "features": layer.featureCount(), "crs": layer.crs().authid(),
            "fields": layer.fields().names()}


def option(command: str, flag: str) -> str | None:
    """The value of ``flag`` in an engine command line, None when absent."""
    words = command.split()
    return words[words.index(flag) + 1] if flag in words else None


def add_raster(path: str, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(path, name)
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


# a 150 m x 150 m corner of the 450 m SpaceNet tile keeps the runs short
EXTENT = "733601,733751,3724989,3725139 [EPSG:32616]"
# the whole SAR example in UTM (see harness.sar_example_in_utm)
SAR_EXTENT = "733601,734092,3724818,3725139 [EPSG:32616]"
facts: dict = {"scenario": SCENARIO}
if SCENARIO == "segment":
    # The SAR example georeferenced in UTM (24 annotated ships), with its whole extent given: ships must be found.
    sar = sar_example_in_utm(WORK)
    out = os.path.join(WORK, "segment.gpkg")
    fb = Feedback()
    res = processing.run("delineate:segment", {
        "INPUT": sar, "MODEL": "ssdd-ship", "EXTENT": SAR_EXTENT,
        "TILE_SIZE": 256, "OVERLAP": 32, "SCORE_THRESHOLD": 0.3, "BANDS": "1", "DEVICE": 1, "OUTPUT": out},
        feedback=fb)
    facts["output"] = res["OUTPUT"]
    facts["result"] = describe(res["OUTPUT"])
    facts["progress_max"] = max(fb.values or [0])
    try:
        processing.run("delineate:segment", {"INPUT": SPACENET, "MODEL": os.path.join(WORK, "missing.safetensors"),
                                             "OUTPUT": os.path.join(WORK, "bad.gpkg")})
        facts["error"] = None
    except QgsProcessingException as exc:
        facts["error"] = str(exc)
    facts["bad_output_exists"] = os.path.exists(os.path.join(WORK, "bad.gpkg"))
elif SCENARIO == "finetune":
    model = os.path.join(WORK, "buildings.safetensors")
    fb = Feedback()
    res = processing.run("delineate:finetune", {
        "RASTER": [str(DATA / "sample_geotiff.tif")], "LABELS": str(DATA / "geotiff_labels.geojson"),
        "CLASS_FIELD": "building", "BASE_MODEL": "nwpu10", "EPOCHS": 1, "CHIP_SIZE": 128, "CHIPS_PER_EPOCH": 4,
        "BATCH_SIZE": 2, "DEVICE": 1, "OUTPUT_MODEL": model}, feedback=fb)
    facts["output_model"] = res["OUTPUT_MODEL"]
    facts["model_exists"] = os.path.isfile(res["OUTPUT_MODEL"])
    facts["mask_ap"], facts["box_ap"] = res.get("MASK_AP"), res.get("BOX_AP")
    facts["progress_max"] = max(fb.values or [0])
    facts["epoch_lines"] = [line for line in fb.infos if line.startswith("epoch")]
    from qgis_plugin.settings import user_models

    facts["registered"] = os.path.abspath(model) in user_models()
    seg = processing.run("delineate:segment", {"INPUT": str(DATA / "sample_geotiff.tif"), "MODEL": model,
                                               "EXTENT": EXTENT, "TILE_SIZE": 256, "DEVICE": 1,
                                               "OUTPUT": os.path.join(WORK, "with_new_model.gpkg")})
    facts["segment_with_new_model"] = describe(seg["OUTPUT"])
elif SCENARIO == "web":
    web = local_xyz_layer(WORK)
    facts["web_valid"], facts["web_crs"] = web.isValid(), web.crs().authid()
    mid = spacenet_middle(web.crs())
    out = os.path.join(WORK, "web.gpkg")
    fb = Feedback()
    try:
        res = processing.run("delineate:segment", {
            "INPUT": web, "MODEL": os.path.join(WORK, "ssdd-ship-2m.safetensors"), "DEVICE": 1, "OUTPUT": out,
            "EXTENT": f"{mid.xMinimum()},{mid.xMaximum()},{mid.yMinimum()},{mid.yMaximum()} [EPSG:3857]"},
            feedback=fb)
        facts["error"], facts["result"] = None, describe(res["OUTPUT"])
    except QgsProcessingException as exc:
        facts["error"], facts["result"] = str(exc), None
    segment_commands = [c for c in fb.commands if " segment " in f" {c} "]
    facts["segment_commands"] = segment_commands
    facts["bands"] = [option(c, "--bands") for c in segment_commands]
    facts["rendered"] = fb.inputs
    facts["infos"] = fb.infos
    facts["renders_left"] = [p for p in glob.glob(os.path.join(QgsProcessingUtils.tempFolder(), "*"))
                             if "render" in os.path.basename(p)]
elif SCENARIO == "pan":
    pan = str(DATA / "pan1.tif")  # SpaceNet 6 panchromatic: 600 x 600 px, 1 band uint16, 0.5 m, EPSG:32631
    source = QgsRasterLayer(pan, "pan")
    facts["pan_bands"] = source.bandCount()
    ext = source.extent()
    corner = f"{ext.xMinimum()},{ext.xMinimum() + 128},{ext.yMaximum() - 128},{ext.yMaximum()} [EPSG:32631]"
    out = os.path.join(WORK, "pan.gpkg")
    fb = Feedback()
    try:
        res = processing.run("delineate:segment", {"INPUT": pan, "EXTENT": corner, "DEVICE": 1, "OUTPUT": out},
                             feedback=fb)  # MODEL: its default, nwpu10
        facts["error"], facts["result"] = None, describe(res["OUTPUT"])
    except QgsProcessingException as exc:
        facts["error"], facts["result"] = str(exc), None
    facts["warnings"], facts["infos"], facts["console"] = fb.warnings, fb.infos, fb.console
    facts["bands"] = [option(c, "--bands") for c in fb.commands if " segment " in f" {c} "]
elif SCENARIO == "batch":
    from osgeo import gdal
    from processing.core.ProcessingConfig import ProcessingConfig
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog
    from processing.tools import dataobjects
    from qgis.core import QgsApplication
    from qgis.PyQt.QtWidgets import QTextEdit

    sar = sar_example_in_utm(WORK)
    left = os.path.join(WORK, "ssdd_left.tif")  # its left half (245 of 491 columns)
    gdal.Translate(left, sar, srcWin=[0, 0, 245, 321])
    layers = [add_raster(sar, "ssdd whole"), add_raster(left, "ssdd left")]
    outputs = [os.path.join(WORK, "batch_whole.gpkg"), os.path.join(WORK, "batch_left.gpkg")]
    alg = QgsApplication.processingRegistry().createAlgorithmById("delineate:segment")
    dialog = BatchAlgorithmDialog(alg, parent=qgis.utils.iface.mainWindow())
    panel = dialog.mainWidget()
    panel.addRow()  # the dialog starts with one row
    context = dataobjects.createContext()
    for row, (layer, output) in enumerate(zip(layers, outputs)):
        values = {"INPUT": layer.id(), "MODEL": "ssdd-ship", "TILE_SIZE": 256, "OVERLAP": 32,
                  "SCORE_THRESHOLD": 0.3, "BANDS": "1", "DEVICE": 1}
        for name, value in values.items():
            panel.wrappers[row][panel.parameter_to_column[name]].setParameterValue(value, context)
        panel.tblParameters.cellWidget(row + 1, panel.parameter_to_column["OUTPUT"]).setValue(output)
    panel.checkLoadLayersOnCompletion.setChecked(True)
    # QGIS names a loaded output after its file by default: turn that off to see the algorithm's own layer name
    ProcessingConfig.setSettingValue(ProcessingConfig.PREFER_FILENAME_AS_LAYER_NAME, False)
    facts["rows"] = panel.batchRowCount()
    dialog.runAlgorithm()
    facts["outputs"] = [describe(p) if os.path.exists(p) else None for p in outputs]
    log_view = dialog.findChild(QTextEdit, "txtLog")
    facts["log"] = log_view.toPlainText()[-3000:] if log_view is not None else ""
    facts["left_extent_ok"] = all(
        f.geometry().boundingBox().xMaximum() <= 733601 + 245 + 1
        for f in QgsVectorLayer(f"{outputs[1]}|layername=instances", "left", "ogr").getFeatures())
    facts["loaded"] = []
    for lyr in QgsProject.instance().mapLayers().values():
        if isinstance(lyr, QgsVectorLayer):
            renderer = lyr.renderer()
            facts["loaded"].append({
                "name": lyr.name(), "source": lyr.source().split("|")[0], "features": lyr.featureCount(),
                "renderer": renderer.type(),
                "class_attribute": getattr(renderer, "classAttribute", lambda: None)()})
elif SCENARIO == "model":
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterRasterLayer,
    )

    static = QgsProcessingModelChildParameterSource.fromStaticValue
    model = QgsProcessingModelAlgorithm("ships and their points", "Delineate tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("raster", "SAR raster"),
                            QgsProcessingModelParameter("raster"))
    segment = QgsProcessingModelChildAlgorithm("delineate:segment")
    segment.setChildId("segment")
    segment.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromModelParameter("raster")])
    for name, value in {"MODEL": "ssdd-ship", "EXTENT": SAR_EXTENT, "TILE_SIZE": 256, "OVERLAP": 32,
                        "SCORE_THRESHOLD": 0.3, "BANDS": "1", "DEVICE": 1}.items():
        segment.addParameterSources(name, [static(value)])
    instances = QgsProcessingModelOutput("instances", "Ship outlines")
    instances.setChildOutputName("OUTPUT")
    segment.setModelOutputs({"instances": instances})
    model.addChildAlgorithm(segment)
    points = QgsProcessingModelChildAlgorithm("native:pointonsurface")
    points.setChildId("points")
    points.addParameterSources("INPUT", [QgsProcessingModelChildParameterSource.fromChildOutput("segment", "OUTPUT")])
    points.addParameterSources("ALL_PARTS", [static(False)])
    points_out = QgsProcessingModelOutput("points", "Ship points")
    points_out.setChildOutputName("OUTPUT")
    points.setModelOutputs({"points": points_out})
    model.addChildAlgorithm(points)
    path = os.path.join(WORK, "ships.model3")
    facts["saved"] = model.toFile(path)
    loaded = QgsProcessingModelAlgorithm()
    facts["read_back"] = loaded.fromFile(path)
    facts["parameters"] = sorted(p.name() for p in loaded.parameterDefinitions())
    sar = sar_example_in_utm(WORK)
    names = {p.name(): p for p in loaded.destinationParameterDefinitions()}
    params = {"raster": sar}
    for name in names:
        params[name] = os.path.join(WORK, f"model_{name.replace(':', '_')}.gpkg")
    fb = Feedback()
    res = processing.run(loaded, params, feedback=fb)
    facts["results"] = {k: str(v) for k, v in res.items()}
    shapes = QgsVectorLayer(f"{res['segment:instances']}|layername=instances", "shapes", "ogr")
    point_layer = QgsVectorLayer(res["points:points"], "points", "ogr")
    facts["instances"] = describe(res["segment:instances"])
    facts["points"] = {"valid": point_layer.isValid(), "features": point_layer.featureCount(),
                       "crs": point_layer.crs().authid(), "geometry": point_layer.geometryType(),
                       "fields": point_layer.fields().names()}
    polygons = [(f.geometry(), f["score"]) for f in shapes.getFeatures()]
    facts["points_inside"] = all(any(g.contains(p.geometry()) and s == p["score"] for g, s in polygons)
                                 for p in point_layer.getFeatures())
else:
    raise SystemExit(f"unknown scenario {SCENARIO}")
report(facts)
