"""Processing scenarios, headless (no iface, like qgis_process): ``python3 processing_scenarios.py SCENARIO WORKDIR``.

segment:  processing.run("delineate:segment") on a georeferenced SAR raster (the SSDD example put in UTM) -> GeoPackage
          layer `instances` in its CRS, with the ships found;
          a missing model -> QgsProcessingException carrying the engine's message.
finetune: processing.run("delineate:finetune") on the SpaceNet sample (1 short epoch) -> a model file, registered
          in the settings, which delineate:segment then runs with.
Prints one JSON line of facts (last line of stdout).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, init_processing, report, sar_example_in_utm  # noqa: E402
from qgis.core import QgsProcessingException, QgsProcessingFeedback, QgsVectorLayer  # noqa: E402

import qgis_plugin  # noqa: E402

SCENARIO, WORK = sys.argv[1], sys.argv[2]
SPACENET = str(ROOT / "examples" / "spacenet_atlanta.tif")
DATA = ROOT.parent / "shared" / "data" / "spacenet_samples"

init_processing()
plugin = qgis_plugin.classFactory(None)
plugin.initProcessing()  # what QGIS and qgis_process do for hasProcessingProvider=yes

import processing  # noqa: E402


class Feedback(QgsProcessingFeedback):
    """Keeps the progress values and info lines."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []
        self.infos: list[str] = []
        self.progressChanged.connect(self.values.append)

    def pushInfo(self, info: str) -> None:  # noqa: N802
        self.infos.append(info)


def describe(path: str) -> dict:
    layer = QgsVectorLayer(f"{path}|layername=instances", "instances", "ogr")
    return {"valid": layer.isValid(), "features": layer.featureCount(), "crs": layer.crs().authid(),
            "fields": layer.fields().names()}


# a 150 m x 150 m corner of the 450 m SpaceNet tile keeps the runs short
EXTENT = "733601,733751,3724989,3725139 [EPSG:32616]"
facts: dict = {"scenario": SCENARIO}
if SCENARIO == "segment":
    # The SAR example georeferenced in UTM (24 annotated ships), with its whole extent given: ships must be found.
    sar = sar_example_in_utm(WORK)
    out = os.path.join(WORK, "segment.gpkg")
    fb = Feedback()
    res = processing.run("delineate:segment", {
        "INPUT": sar, "MODEL": "ssdd-ship", "EXTENT": "733601,734092,3724818,3725139 [EPSG:32616]",
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
else:
    raise SystemExit(f"unknown scenario {SCENARIO}")
report(facts)
