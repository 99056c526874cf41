"""``rs-engine serve``: a long-lived engine for interactive outlining, JSON lines on stdin and stdout.

The model is loaded once, rasters stay open and window embeddings are cached (:class:`~rs_engine.outlining.Outliner`),
so a click pays neither Python start-up nor model loading, and a further click in the same window only the heads.

Protocol (one JSON object per line each way; stderr carries logs only):

- on start, once the model is loaded: ``{"event": "ready", "model": LABEL, "classes": [...], "gsd": m or null,
  "tile_size": px, "bands": n}`` (a model that fails to load: an ``error`` event and exit code 2);
- ``{"op": "prompt", "id": ANY, "raster": PATH, "bands": [1, 2, 3] or null, "point": [x, y] (or [[x, y], ...])
  or null, "box": [minx, miny, maxx, maxy] or null, "crs": "EPSG:3857" | WKT | null}`` (coordinates in ``crs``;
  null: the raster's) -> ``{"event": "outline", "id": ANY, "wkt": MULTIPOLYGON in the request's CRS or null when
  nothing was found, "score": 0-1, "class_id": n, "class_name": str, "model": LABEL, "seconds": s,
  "embedded": true when a new window was computed}``;
- ``{"op": "embed", ...}`` with the fields of a prompt: computes the window the prompt would use ->
  ``{"event": "embedded", "id": ANY, "seconds": s, "computed": bool}``;
- ``{"op": "quit"}`` -> ``{"event": "bye"}``, exit 0; end of input exits 0 too.

Any bad request gets ``{"event": "error", "id": ANY, "message": one line}`` and the server goes on.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

import shapely
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape

from rs_engine.errors import InputError
from rs_engine.outlining import Outliner
from rs_engine.prompts import parse_crs, prompt_from_request

log = logging.getLogger(__name__)


def _reply(out: IO[str], **fields: Any) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


def serve(model: str = "nwpu10", device: str = "auto", threads: int | None = None,
          stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    """Answer requests until ``quit`` or the end of ``stdin``; returns the exit code (0).

    Raises:
        InputError: the model cannot be loaded (before ``ready``).
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    outliner = Outliner(model, device, threads)
    card = outliner.card
    _reply(stdout, event="ready", model=card.label, classes=list(card.class_names), gsd=card.gsd,
           tile_size=card.tile_size, bands=card.bands)  # fmt: skip
    try:
        for line in stdin:
            if not line.strip():
                continue
            request: Any = None
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise InputError("a request is a JSON object")
                op = request.get("op")
                if op == "quit":
                    _reply(stdout, event="bye")
                    return 0
                if op not in ("prompt", "embed"):
                    raise InputError(f"unknown op {op!r}: use prompt, embed or quit")
                _reply(stdout, **_answer(outliner, op, request))
            except json.JSONDecodeError as exc:
                _reply(stdout, event="error", id=None, message=f"not JSON: {exc}")
            except InputError as exc:
                _reply(stdout, event="error", id=_id(request), message=" ".join(str(exc).split()))
            except Exception as exc:  # the server outlives one bad request; the traceback goes to the log
                log.exception("request failed")
                _reply(stdout, event="error", id=_id(request),
                       message=f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])
    finally:
        outliner.close()
    return 0


def _id(request: Any) -> Any:
    return request.get("id") if isinstance(request, dict) else None


def _answer(outliner: Outliner, op: str, request: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    if not isinstance(request.get("raster"), str):
        raise InputError("a request needs 'raster', the path of a raster file")
    bands = request.get("bands")
    if bands is not None and not (isinstance(bands, list) and all(isinstance(b, int) and b >= 1 for b in bands)):
        raise InputError("'bands' is a list of 1-based band numbers or null")
    source = outliner.source(request["raster"], bands)
    crs = parse_crs(request.get("crs"), "request")
    pid = request.get("id", "request")
    prompt = prompt_from_request(pid, request.get("point"), request.get("box"), crs, source.crs)
    if op == "embed":
        computed = outliner.embed(source, prompt)
        return {"event": "embedded", "id": request.get("id"), "seconds": round(time.perf_counter() - start, 4),
                "computed": computed}
    result = outliner.run(source, prompt)
    wkt = None
    if result.geometry is not None:
        geometry = result.geometry
        if crs is not None and source.crs is not None and crs != source.crs:
            geometry = shapely.make_valid(shape(transform_geom(source.crs, crs, mapping(geometry))))
        wkt = geometry.wkt
    return {"event": "outline", "id": request.get("id"), "wkt": wkt, "score": round(result.score, 4),
            "class_id": result.class_id, "class_name": result.class_name, "model": outliner.card.label,
            "seconds": round(time.perf_counter() - start, 4), "embedded": result.embedded}
