"""Dock scenarios in real QGIS (offscreen), one per process: ``python3 dock_scenarios.py SCENARIO WORKDIR``.

segment: two raster layers at once (the map canvas as extent) -> two styled result layers in the raster's CRS,
         with the ships of the SAR example found.
cancel:  Cancel during a run -> no layer, no output file, no engine temp file.
error:   a band the raster lacks -> the engine's one-line message in the message bar.
kill:    the engine process killed mid-run -> "engine stopped unexpectedly" reported; the next run works.
retrain: the Retrain tab fine-tunes on an edited polygon layer; the new model joins the model list.
web:     an XYZ layer (local tiles) is rendered through QGIS at the map canvas extent, then segmented.
pan:     a 1-band raster (the SpaceNet example) with the 3-band nwpu10: no band pre-check, the engine repeats band 1;
         its notice reaches the dock's log and the QGIS message log (as a warning).
Prints one JSON line of facts (last line of stdout).
"""

import glob
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    ROOT,
    FakeIface,
    flush_deletes,
    load_plugin,
    local_xyz_layer,
    report,
    sar_example_in_utm,
    spacenet_middle,
    wait_until,
)
from qgis.core import (  # noqa: E402
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorDataProvider,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QProcess  # noqa: E402

SCENARIO, WORK = sys.argv[1], sys.argv[2]
SPACENET = str(ROOT / "examples" / "spacenet_atlanta.tif")
SSDD = str(ROOT / "examples" / "ssdd_001111.jpg")
RUN_TIMEOUT = 240

iface = FakeIface()
iface.window.resize(1000, 700)
plugin = load_plugin(iface)
dock = plugin.show_dock()
assert wait_until(lambda: bool(dock.catalog.models), 120), "engine did not list its models"
dock.select_model("ssdd-ship")
results: list = []
dock.runFinished.connect(results.append)
facts: dict = {"scenario": SCENARIO}


def tiled_copy(path: str, out: str, reps: int = 4) -> str:
    """``path`` repeated ``reps`` x ``reps`` times in one GeoTIFF (same pixel size and origin): a raster of many
    tiles, so that a run is still going when the cancel arrives, whatever the runtime's speed."""
    import numpy as np
    from osgeo import gdal

    src = gdal.Open(path)
    pixels = np.tile(src.ReadAsArray(), (1, reps, reps))
    dst = gdal.GetDriverByName("GTiff").Create(out, pixels.shape[2], pixels.shape[1], pixels.shape[0],
                                               src.GetRasterBand(1).DataType)
    dst.SetGeoTransform(src.GetGeoTransform())
    dst.SetProjection(src.GetProjection())
    for i, band in enumerate(pixels, 1):
        dst.GetRasterBand(i).WriteArray(band)
    dst = None
    return out


def add_raster(path: str, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(path, name)
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def run_and_wait(on_progress=None) -> object:
    """Click Segment, optionally act on the first progress event after a tile (the engine is writing its
    temporary GeoPackage then), wait for the end."""
    n = len(results)
    fired = []
    if on_progress is not None:
        def hook(event: dict) -> None:
            if event.get("event") == "progress" and event.get("done", 0) > 0 and not fired:
                fired.append(event)
                on_progress()
        dock.segment_tab.segment_button.click()
        if dock.job is not None:
            dock.job.engineEvent.connect(hook)
    else:
        dock.segment_tab.segment_button.click()
    assert wait_until(lambda: len(results) > n, RUN_TIMEOUT), "run did not finish"
    facts.setdefault("progress_hooks", []).append(len(fired))
    return results[-1]


def vector_layers() -> list:
    return [lyr for lyr in QgsProject.instance().mapLayers().values()
            if isinstance(lyr, QgsVectorLayer) and lyr.providerType() == "ogr"]


def leftovers(folder: str) -> list:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")) + glob.glob(
        os.path.join(folder, ".*")) if p.endswith((".gpkg", ".gpkg-wal", ".gpkg-shm", ".tif")) or ".tmp-" in p)


if SCENARIO == "segment":
    # The SAR example georeferenced in UTM (24 annotated ships), twice: the ship model must find ships.
    sar = sar_example_in_utm(WORK)
    a = add_raster(sar, "ssdd A")
    b = add_raster(sar, "ssdd B")
    dock.set_checked_rasters([a.id(), b.id()])
    iface.canvas.setDestinationCrs(a.crs())
    ext = a.extent()
    iface.canvas.setExtent(QgsRectangle(ext.xMinimum(), ext.yMaximum() - 200, ext.xMinimum() + 300,
                                        ext.yMaximum()))
    iface.canvas.refresh()
    dock.segment_tab.extent_combo.setCurrentIndex(1)  # map canvas
    dock.segment_tab.output_widget.setFilePath("")  # temporary outputs
    facts["bands_prefilled"] = dock.segment_tab.bands_edit.text()
    facts["tile_prefilled"] = dock.segment_tab.tile_spin.value()
    facts["score_prefilled"] = dock.segment_tab.score_spin.value()
    result = run_and_wait()
    facts["ok"], facts["message"] = result.ok, result.message
    layers = vector_layers()
    facts["layers"] = []
    for layer in layers:
        caps = layer.dataProvider().capabilities()
        feats = list(layer.getFeatures())
        renderer = layer.renderer()
        facts["layers"].append({
            "name": layer.name(),
            "source": layer.source(),
            "crs": layer.crs().authid(),
            "features": layer.featureCount(),
            "fields": layer.fields().names(),
            "renderer": renderer.type(),
            "class_attribute": getattr(renderer, "classAttribute", lambda: None)(),
            "categories": [c.value() for c in getattr(renderer, "categories", lambda: [])()],
            "scores_ok": all(0 <= f["score"] <= 1 for f in feats),
            "editable": bool(caps & QgsVectorDataProvider.ChangeAttributeValues
                             and caps & QgsVectorDataProvider.AddFeatures),
            "start_editing": layer.startEditing() and layer.rollBack(),
            "within_canvas_extent": all(iface.canvas.extent().buffered(300).contains(f.geometry().boundingBox())
                                        for f in feats),
        })
    facts["raster_crs"] = a.crs().authid()
elif SCENARIO == "cancel":
    # 16 copies (3600 px, about 100 tiles): 4 tiles ran out in under a second with OpenVINO, before the cancel
    os.makedirs(os.path.join(WORK, "inputs"), exist_ok=True)  # not among the output folder's leftovers
    layer = add_raster(tiled_copy(SPACENET, os.path.join(WORK, "inputs", "atlanta_x16.tif")), "atlanta x16")
    dock.set_checked_rasters([layer.id()])
    out = os.path.join(WORK, "cancelled.gpkg")
    dock.segment_tab.output_widget.setFilePath(out)
    result = run_and_wait(on_progress=dock.segment_tab.cancel_button.click)
    facts["cancelled"], facts["ok"], facts["exit_code"] = result.cancelled, result.ok, result.exit_code
    facts["layers_added"] = len(vector_layers())
    facts["output_exists"] = os.path.exists(out)
    facts["leftovers"] = leftovers(WORK)
    facts["temp_leftovers"] = leftovers(dock._tmpdir) if dock._tmpdir else []
    tab = dock.segment_tab
    facts["buttons_reset"] = tab.segment_button.isEnabled() and not tab.cancel_button.isEnabled()
elif SCENARIO == "error":
    layer = add_raster(SSDD, "ssdd")
    dock.set_checked_rasters([layer.id()])
    dock.segment_tab.bands_edit.setText("5")
    dock.segment_tab.output_widget.setFilePath(os.path.join(WORK, "error.gpkg"))
    result = run_and_wait()
    facts["ok"], facts["exit_code"], facts["message"] = result.ok, result.exit_code, result.message
    facts["bar_messages"] = iface.messages
    facts["layers_added"] = len(vector_layers())
    facts["output_exists"] = os.path.exists(os.path.join(WORK, "error.gpkg"))
elif SCENARIO == "kill":
    layer = add_raster(SPACENET, "atlanta")
    dock.set_checked_rasters([layer.id()])
    out = os.path.join(WORK, "killed.gpkg")
    dock.segment_tab.output_widget.setFilePath(out)

    def kill_engine() -> None:
        facts["killed_pid"] = dock.job.pid
        os.kill(dock.job.pid, signal.SIGKILL)

    result = run_and_wait(on_progress=kill_engine)
    facts["first"] = {"ok": result.ok, "cancelled": result.cancelled, "message": result.message}
    facts["bar_messages"] = list(iface.messages)
    facts["layers_after_kill"] = len(vector_layers())
    facts["leftovers_after_kill"] = leftovers(WORK)
    # the next run works (on a raster without georeferencing, extent: a selected polygon over its left half)
    small = add_raster(SSDD, "ssdd")
    dock.set_checked_rasters([small.id()])
    dock.segment_tab.bands_edit.setText("1")
    aoi = QgsVectorLayer("Polygon", "aoi", "memory")
    feature = QgsFeature()
    feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(0, -321, 245, 0)))  # pixel frame: x = col, y = -row
    aoi.dataProvider().addFeatures([feature])
    QgsProject.instance().addMapLayer(aoi)
    aoi.selectAll()
    dock.segment_tab.extent_combo.setCurrentIndex(2)
    dock.segment_tab.extent_layer_combo.setLayer(aoi)
    dock.segment_tab.output_widget.setFilePath(os.path.join(WORK, "next.gpkg"))
    result = run_and_wait()
    facts["second"] = {"ok": result.ok, "message": result.message}
    facts["layers_after_second"] = [(lyr.name(), lyr.featureCount()) for lyr in vector_layers()
                                    if lyr.name() != "aoi"]
    out = QgsVectorLayer(os.path.join(WORK, "next.gpkg") + "|layername=instances", "next", "ogr")
    facts["second_within_selection"] = all(f.geometry().boundingBox().xMinimum() < 245 + 10
                                           for f in out.getFeatures())
elif SCENARIO == "web":
    # a web (XYZ) layer: local tiles made with gdal2tiles, read through QGIS's wms provider like any XYZ service
    web = local_xyz_layer(WORK)
    facts["web_valid"] = web.isValid()
    dock.set_checked_rasters([web.id()])
    facts["bands_prefilled"] = dock.segment_tab.bands_edit.text()
    iface.canvas.setDestinationCrs(web.crs())
    mid = spacenet_middle(web.crs())  # the middle 200 m of the SpaceNet tile, in the web layer's CRS (EPSG:3857)
    iface.canvas.setExtent(mid)
    dock.segment_tab.extent_combo.setCurrentIndex(1)
    dock.segment_tab.output_widget.setFilePath(os.path.join(WORK, "web.gpkg"))
    result = run_and_wait()
    facts["ok"], facts["message"] = result.ok, result.message
    facts["log"] = dock.log_view.toPlainText()[-2000:]
    layers = vector_layers()
    facts["layers"] = [(lyr.name(), lyr.featureCount(), lyr.crs().authid()) for lyr in layers]
    facts["web_crs"] = web.crs().authid()
    facts["renders_left"] = glob.glob(os.path.join(dock._tmpdir or WORK, "render_*"))
elif SCENARIO == "pan":
    from qgis.core import Qgis, QgsApplication

    logged: list = []
    QgsApplication.messageLog().messageReceived.connect(
        lambda message, tag, level: logged.append((message, tag, int(level))))
    layer = add_raster(SPACENET, "atlanta")
    dock.select_model("nwpu10")
    dock.set_checked_rasters([layer.id()])
    facts["bands_prefilled"] = dock.segment_tab.bands_edit.text()
    ext = layer.extent()  # its upper-left 128 m (256 px): one tile
    iface.canvas.setDestinationCrs(layer.crs())
    iface.canvas.setExtent(QgsRectangle(ext.xMinimum(), ext.yMaximum() - 128, ext.xMinimum() + 128, ext.yMaximum()))
    dock.segment_tab.extent_combo.setCurrentIndex(1)
    dock.segment_tab.output_widget.setFilePath(os.path.join(WORK, "pan.gpkg"))
    result = run_and_wait()
    facts["ok"], facts["message"] = result.ok, result.message
    facts["log"] = dock.log_view.toPlainText()[-3000:]
    facts["layers"] = [(lyr.name(), lyr.featureCount(), lyr.crs().authid()) for lyr in vector_layers()]
    facts["warnings_logged"] = [m for m, tag, level in logged if tag == "Delineate" and level == int(Qgis.Warning)]
elif SCENARIO == "retrain":
    # Retrain tab: an edited (unsaved) polygon layer -> temporary GeoPackage -> rs-train finetune -> model list
    data = ROOT.parent / "shared" / "data" / "spacenet_samples"
    raster = add_raster(str(data / "sample_geotiff.tif"), "spacenet sample")
    labels = QgsVectorLayer(str(data / "geotiff_labels.geojson"), "buildings", "ogr")
    QgsProject.instance().addMapLayer(labels)
    labels.startEditing()
    first = next(labels.getFeatures())
    labels.changeAttributeValue(first.id(), labels.fields().indexOf("building"), "yes")  # an unsaved edit
    facts["labels_modified"] = labels.isModified()
    dock.retrain_tab.labels_combo.setLayer(labels)
    dock.retrain_tab.class_field_combo.setField("building")
    dock.set_checked_rasters([raster.id()], train=True)
    dock.retrain_tab.base_model_combo.setCurrentIndex(dock.retrain_tab.base_model_combo.findData("nwpu10"))
    dock.retrain_tab.epochs_spin.setValue(1)
    dock.retrain_tab.chip_spin.setValue(128)
    dock.retrain_tab.extra_edit.setText("--chips-per-epoch 4 --batch-size 2 --device cpu")
    model = os.path.join(WORK, "retrained.safetensors")
    dock.retrain_tab.model_output_widget.setFilePath(model)
    trained: list = []
    dock.trainFinished.connect(trained.append)
    dock.retrain_tab.train_button.click()
    assert wait_until(lambda: bool(trained), RUN_TIMEOUT), "training did not finish"
    result = trained[-1]
    facts["ok"], facts["message"] = result.ok, result.message
    facts["model_exists"] = os.path.isfile(model)
    assert wait_until(lambda: dock.catalog.find(model) is not None and not dock.catalog.busy(), 60)
    facts["in_model_list"] = dock.segment_tab.model_combo.findData(model) >= 0
    facts["selected_model"] = dock.segment_tab.model_combo.currentData()
    from qgis_plugin.settings import user_models

    facts["registered"] = model in user_models()
    facts["status"] = dock.retrain_tab.train_status.text()
    facts["progress"] = dock.progress.value()
    log_text = dock.log_view.toPlainText()
    facts["labels_exported"] = "--labels " + str(data / "geotiff_labels.geojson") not in log_text and \
        "buildings.gpkg" in log_text
    facts["epoch_logged"] = "validation mask AP" in log_text
else:
    raise SystemExit(f"unknown scenario {SCENARIO}")

plugin.unload()
flush_deletes()
facts["processes_left"] = len(iface.window.findChildren(QProcess))
report(facts)
