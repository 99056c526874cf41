"""A stand-in for ``rs-engine serve`` (same JSON-lines protocol, no model) for the Outline tool's client tests:
``python3 fake_serve.py serve --model NAME [--device D]``.

prompt: the raster is opened with GDAL (an unreadable one or a prompt outside it: an error event); a prompt in
the left tenth of the raster finds nothing (``"wkt": null``); else the outline is a square of a twentieth of the
raster's width around the point (or the box itself), in the request's CRS. Replies also carry what the fake saw
(``raster_size``, ``bands``) so the tests can check what the plugin sent. ``{"op": "crash"}`` exits 3 at once.
"""

import argparse
import json
import sys
import time

from osgeo import gdal, ogr, osr

gdal.UseExceptions()
osr.UseExceptions()


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def srs_of(text: str | None, dataset: gdal.Dataset) -> osr.SpatialReference | None:
    wkt = dataset.GetProjection() if text is None else None
    srs = osr.SpatialReference()
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    if text is not None:
        srs.SetFromUserInput(text)
    elif wkt:
        srs.ImportFromWkt(wkt)
    else:
        return None
    return srs


def prompt(request: dict) -> dict:
    t0 = time.perf_counter()
    dataset = gdal.Open(request["raster"])
    x0, dx, _, y0, _, dy = dataset.GetGeoTransform()
    if not dataset.GetProjection():  # QGIS's pixel frame for a raster without georeferencing
        x0, dx, y0, dy = 0.0, 1.0, 0.0, -1.0
    width = dataset.RasterXSize * dx
    raster_srs = srs_of(None, dataset)
    request_srs = srs_of(request.get("crs"), dataset)
    to_raster = to_request = None
    if raster_srs is not None and request_srs is not None and not raster_srs.IsSame(request_srs):
        to_raster = osr.CoordinateTransformation(request_srs, raster_srs)
        to_request = osr.CoordinateTransformation(raster_srs, request_srs)
    if request.get("box"):
        minx, miny, maxx, maxy = request["box"]
        px, py = (minx + maxx) / 2, (miny + maxy) / 2
    else:
        px, py = request["point"]
    rx, ry = to_raster.TransformPoint(px, py)[:2] if to_raster else (px, py)
    col, row = (rx - x0) / dx, (ry - y0) / dy
    if not (0 <= col < dataset.RasterXSize and 0 <= row < dataset.RasterYSize):
        return {"event": "error", "message": f"{request['raster']}: the prompt ({px:g}, {py:g}) is outside the raster"}
    reply = {"event": "outline", "score": 0.9, "class_id": 1, "class_name": "thing", "model": MODEL,
             "embedded": True, "raster_size": [dataset.RasterXSize, dataset.RasterYSize],
             "bands": request.get("bands"), "pixel": [col, row]}
    if col < dataset.RasterXSize / 10:
        return dict(reply, wkt=None, score=None, class_id=None, class_name=None, seconds=time.perf_counter() - t0)
    half = width / 40
    ring = [(rx - half, ry - half), (rx + half, ry - half), (rx + half, ry + half), (rx - half, ry + half)]
    if request.get("box") and not to_raster:
        ring = [(minx, miny), (maxx, miny), (maxx, maxy), (minx, maxy)]
    if to_request:
        ring = [to_request.TransformPoint(x, y)[:2] for x, y in ring]
    geometry = ogr.CreateGeometryFromWkt("MULTIPOLYGON (((" + ", ".join(f"{x} {y}" for x, y in ring + ring[:1])
                                         + ")))")
    return dict(reply, wkt=geometry.ExportToWkt(), seconds=time.perf_counter() - t0)


parser = argparse.ArgumentParser()
parser.add_argument("command")
parser.add_argument("--model", default="fake")
parser.add_argument("--device", default="auto")
parser.add_argument("--threads", type=int)
args = parser.parse_args()
if args.model == "broken":
    emit({"event": "error", "message": "model broken not found"})
    sys.exit(2)
MODEL = f"{args.model} fake"
time.sleep(0.3)  # "loading the model": requests sent meanwhile must wait for ready
print("fake serve: model loaded", file=sys.stderr, flush=True)
emit({"event": "ready", "model": MODEL, "classes": ["thing"], "gsd": 0.5, "tile_size": 512, "bands": 3})
for line in sys.stdin:
    try:
        request = json.loads(line)
    except ValueError:
        emit({"event": "error", "id": None, "message": "bad JSON"})
        continue
    op = request.get("op")
    if op == "quit":
        emit({"event": "bye"})
        sys.exit(0)
    if op == "crash":
        sys.exit(3)
    try:
        reply = prompt(request) if op == "prompt" else {"event": "embedded", "seconds": 0.0}
    except Exception as exc:  # noqa: BLE001 (one line per bad request, as the real server does)
        reply = {"event": "error", "message": f"{type(exc).__name__}: {exc}"}
    emit(dict(reply, id=request.get("id")))
