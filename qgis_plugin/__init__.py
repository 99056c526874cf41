"""Delineate QGIS plugin. PyQGIS only: never imports torch, rasterio or rs_engine; it runs `rs-engine` in its own
process and reads its JSON-lines progress (see DESIGN.md)."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import DelineatePlugin

    return DelineatePlugin(iface)
