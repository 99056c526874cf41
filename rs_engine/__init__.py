"""Delineate inference engine: raster in, instance polygons (GeoPackage) out.

Importable without QGIS. The QGIS plugin talks to it only through the ``rs-engine`` command line.
"""

__version__ = "0.1.0"
