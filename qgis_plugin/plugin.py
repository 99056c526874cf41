"""Plugin entry: registers the menu action; the dock, runner and Processing provider come with the plugin issue."""

from __future__ import annotations

from qgis.PyQt.QtWidgets import QAction


class DelineatePlugin:
    """QGIS plugin object: ``initGui`` adds, ``unload`` removes everything it added."""

    MENU = "&Delineate"

    def __init__(self, iface) -> None:
        self.iface = iface
        self.actions: list[QAction] = []

    def initGui(self) -> None:  # noqa: N802 (QGIS's name)
        action = QAction("Delineate: check engine", self.iface.mainWindow())
        action.triggered.connect(self.check_engine)
        self.iface.addPluginToRasterMenu(self.MENU, action)
        self.actions.append(action)

    def unload(self) -> None:
        for action in self.actions:
            self.iface.removePluginRasterMenu(self.MENU, action)
            action.deleteLater()
        self.actions.clear()

    def check_engine(self) -> None:
        """Run `rs-engine doctor` in a separate process (QProcess: QGIS stays responsive) and show its report."""
        import shutil

        from qgis.PyQt.QtCore import QProcess
        from qgis.PyQt.QtWidgets import QMessageBox

        exe = shutil.which("rs-engine")
        if exe is None:
            QMessageBox.warning(self.iface.mainWindow(), "Delineate", "rs-engine not found on PATH")
            return
        proc = QProcess(self.iface.mainWindow())
        proc.setProcessChannelMode(QProcess.MergedChannels)

        def show(*_args) -> None:
            text = bytes(proc.readAll()).decode(errors="replace")
            QMessageBox.information(self.iface.mainWindow(), "Delineate engine", text or "no output")
            proc.deleteLater()

        proc.finished.connect(show)
        proc.start(exe, ["doctor"])
