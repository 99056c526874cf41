"""Delineate inference engine: raster in, instance polygons (GeoPackage) out.

Importable without QGIS. The QGIS plugin talks to it only through the ``rs-engine`` command line. The small
public API, in the spirit of rasterio's:

- :func:`segment` (with :class:`SegmentOptions`): rasters -> a GeoPackage of instance polygons, as
  ``rs-engine segment``;
- :func:`outline` (with :class:`OutlineOptions`): one object per prompt (points, boxes) -> a GeoPackage, as
  ``rs-engine outline``; :class:`Outliner`, the same one prompt at a time (``rs-engine serve``; needs PyTorch);
- :func:`load_predictor`: a bundled model name or model file -> ``(predictor, ModelCard)`` in PyTorch or ONNX
  Runtime (:mod:`rs_engine.runtime`: numpy tiles in, detections out);
- :func:`load_model`: a bundled model name or ``.safetensors`` file -> ``(torch model in eval mode, ModelCard)``;
- :class:`RasterSource`: the one pixel reader (bands, normalisation, nodata, resampling, windows);
- :class:`InputError`: what every bad input raises (one line; the CLI's exit code 2).

Names are imported on first use, so ``import rs_engine`` stays cheap (no PyTorch until a model is needed), and
everything but :func:`load_model` and outlining works in the light engine, without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "segment": "rs_engine.pipeline",
    "SegmentOptions": "rs_engine.pipeline",
    "SegmentResult": "rs_engine.pipeline",
    "outline": "rs_engine.outlining",
    "OutlineOptions": "rs_engine.outlining",
    "Outliner": "rs_engine.outlining",
    "load_predictor": "rs_engine.runtime",
    "load_model": "rs_engine.checkpoint",
    "ModelCard": "rs_engine.card",
    "RasterSource": "rs_engine.raster",
    "InputError": "rs_engine.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:  # PEP 562: lazy attributes of the package
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rs_engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
