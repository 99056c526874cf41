"""Install-engine scenarios in real QGIS (offscreen, a fresh profile, the plugin installed from its zip), one per
process: ``python3 install_scenarios.py SCENARIO PLUGIN.zip WHEELS WORKDIR``.

units:   the installer's pieces without processes: QGIS's Python found by name (QGIS's own binary skipped,
         Windows layouts), the steps' command lines, the one-line failure messages, replacing an older engine.
install: Settings > Install engine from the local wheel folder WHEELS (offline); Check engine turns green; the
         Segment tab segments a raster layer with the new engine into a styled layer.
fail:    failed installs (no network, a wheel folder lacking wheels, a damaged wheel in the plugin): one message
         each, the old engine setting and the old engine untouched, no temp env left, QGIS still works.
Prints one JSON line of facts (last line of stdout).
"""

import glob
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    PROFILE,
    ROOT,
    FakeIface,
    child_processes,
    flush_deletes,
    install_plugin_zip,
    load_plugin,
    report,
    sar_example_in_utm,
    wait_until,
)
from qgis.core import QgsProject, QgsRasterLayer, QgsSettings, QgsVectorLayer  # noqa: E402
from qgis.PyQt.QtCore import QProcess  # noqa: E402

SCENARIO, ZIP, WHEELS, WORK = sys.argv[1:5]
INSTALL_TIMEOUT = 600
UNREACHABLE = "http://127.0.0.1:9/simple"  # the discard port: connection refused, as without network
STEP_TITLES = ("getting uv", "creating the environment", "installing the engine", "checking the engine")

package = install_plugin_zip(ZIP)
iface = FakeIface()
iface.window.resize(1000, 700)
plugin = load_plugin(iface, package)
dock = plugin.show_dock()
tab = dock.settings_tab
facts: dict = {"scenario": SCENARIO, "plugin_file": sys.modules[package].__file__}
installer = sys.modules[f"{package}.installer"]
settings = sys.modules[f"{package}.settings"]


def click_install(folder: str = "", on_step=None) -> tuple:
    """Install engine with ``folder`` as the wheel folder (``on_step(title)`` at each later step); (result, new
    message bar items, seconds)."""
    import time

    ended: list = []
    n = len(iface.messages)
    tab.wheel_folder_widget.setFilePath(folder)
    t0 = time.monotonic()
    tab.install_button.click()
    if tab.installer is not None:
        tab.installer.installFinished.connect(ended.append)
        if on_step is not None:
            tab.installer.stepStarted.connect(on_step)
        facts.setdefault("cancel_enabled_while_running", []).append(tab.cancel_install_button.isEnabled())
    assert wait_until(lambda: bool(ended) or (tab.installer is None and len(iface.messages) > n),
                      INSTALL_TIMEOUT), "install did not finish"
    return (ended[-1] if ended else None), iface.messages[n:], round(time.monotonic() - t0, 1)


def unreachable_index() -> None:
    """pip's and uv's package index (for the processes QGIS starts from now on) is a closed port."""
    for name in ("PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        os.environ[name] = UNREACHABLE


def temps() -> list:
    home = str(settings.engine_home())
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(home, "engine.*")))


def units() -> None:
    tmp = Path(WORK) / "units"
    (tmp / "usr" / "bin").mkdir(parents=True)
    (tmp / "usr" / "bin" / "python3.11").write_text("")
    (tmp / "qgis.bin").write_text("")
    (tmp / "win").mkdir()
    (tmp / "win" / "python.exe").write_text("")
    facts["qgis_python_here"] = settings.qgis_python()
    facts["qgis_python_binary"] = settings.qgis_python(str(tmp / "qgis.bin"), str(tmp / "qgis.bin"),
                                                        str(tmp / "usr"), (3, 11), windows=False)
    (tmp / "shims").mkdir()
    (tmp / "shims" / "python3").write_text("")  # what PATH gave QGIS as sys.executable: not QGIS's Python
    facts["qgis_python_shim"] = settings.qgis_python(str(tmp / "shims" / "python3"), str(tmp / "shims" / "python3"),
                                                      str(tmp / "usr"), (3, 11), windows=False)
    facts["qgis_python_named"] = settings.qgis_python(str(tmp / "shims" / "python3"), "", str(tmp / "nowhere"),
                                                       (3, 11), windows=False)
    facts["qgis_python_windows"] = settings.qgis_python(str(tmp / "qgis-bin.exe"), "", str(tmp / "win"),
                                                         (3, 12), windows=True)
    facts["qgis_python_missing"] = settings.qgis_python(str(tmp / "qgis.bin"), "", str(tmp / "nowhere"), (3, 11),
                                                        windows=False)
    facts["venv_python"] = [str(settings.venv_python(Path("/e"), windows=False)),
                            str(settings.venv_python(Path("/e"), windows=True))]
    wheel = tmp / "delineate-0.1.0-py3-none-any.whl"
    wheel.write_text("")
    home = tmp / "home"
    offline = installer.InstallPlan("/usr/bin/python3", home, wheel, tmp / "wheels", windows=False)
    online_full = installer.InstallPlan("/usr/bin/python3", home, wheel, None, full=True, windows=False)
    win = installer.InstallPlan("C:/Python/python.exe", home, None, None, windows=True)
    facts["steps_offline"] = [(s.title, s.argv, s.clean_env) for s in offline.steps()]
    facts["steps_online_full"] = [(s.title, s.argv) for s in online_full.steps()]
    facts["steps_windows"] = [s.argv for s in win.steps()]
    steps = offline.steps()  # with step 1: no uv yet
    (home / "tools" / "uv" / "bin").mkdir(parents=True)
    (home / "tools" / "uv" / "bin" / "uv").write_text("")
    (home / "tools" / "uv" / f"uv-{installer.UV_VERSION}.dist-info").mkdir()
    facts["steps_with_uv"] = [s.title for s in offline.steps()]
    uv_missing = ["Using Python 3.11.2 environment at: /p/engine.tmp-1",
                  "  × No solution found when resolving dependencies:",
                  "  ╰─▶ Because rasterio was not found in the provided package locations and delineate==0.1.0",
                  "      depends on rasterio>=1.4, we can conclude that your requirements are unsatisfiable."]
    facts["msg_missing"] = installer.failure_message(steps[2], uv_missing, 1, offline)
    pip_offline = ["Looking in links: /x", "ERROR: Could not find a version that satisfies the requirement uv==0.13.9 "
                   "(from versions: none)", "ERROR: No matching distribution found for uv==0.13.9"]
    facts["msg_pip_missing"] = installer.failure_message(steps[0], pip_offline, 1, offline)
    uv_net = ["error: Failed to fetch: `http://127.0.0.1:9/simple/numpy/`", "  Caused by: Request failed after 3 "
              "retries", "  Caused by: error sending request", "  Caused by: tcp connect error: Connection refused"]
    facts["msg_network"] = installer.failure_message(steps[2], uv_net, 2, online_full)
    uv_zip = ["error: Failed to read `delineate @ file:///p/delineate-0.1.0-py3-none-any.whl`",
              "  Caused by: Failed to unzip wheel: delineate-0.1.0-py3-none-any.whl",
              "  Caused by: invalid Zip archive: Could not find central directory end"]
    facts["msg_damaged"] = installer.failure_message(steps[2], uv_zip, 2, online_full)
    # replacing: an older engine goes; a failed move puts it back
    engine, temp = tmp / "r" / "engine", tmp / "r" / "engine.tmp-1"
    (engine).mkdir(parents=True)
    (engine / "old").write_text("")
    temp.mkdir()
    (temp / "new").write_text("")
    installer.replace_engine(temp, engine)
    facts["replaced"] = sorted(os.listdir(engine)) + sorted(os.listdir(engine.parent))
    try:
        installer.replace_engine(temp, engine)  # temp is gone: the move fails
        facts["replace_missing"] = "no error"
    except OSError:
        facts["replace_missing"] = sorted(os.listdir(engine)) + sorted(os.listdir(engine.parent))


def install() -> None:
    try:
        settings.engine_command("rs-engine")
        facts["engine_before"] = "found"
    except settings.EngineNotFound as exc:
        facts["engine_before"] = str(exc)
    unreachable_index()  # offline: the wheel folder only
    progress: list = []
    dock.progress.valueChanged.connect(progress.append)
    result, messages, seconds = click_install(WHEELS)
    steps = [line.split(":", 1)[0] for line in result.log if line.split(":", 1)[0] in STEP_TITLES]
    facts.update(ok=result.ok, message=result.message, install_seconds=seconds, steps=steps, bar=messages,
                 progress_max=max(progress or [0]), install_log=result.log[-40:])
    facts["setting"] = QgsSettings().value("delineate/engine_python", "", type=str)
    facts["engine_python"] = str(settings.engine_home() / "engine" / "bin" / "python")
    facts["temps"] = temps()
    site = glob.glob(str(settings.engine_home() / "engine" / "lib" / "python3*" / "site-packages"))
    facts["engine_packages"] = sorted(os.listdir(site[0])) if site else []
    facts["field_shows"] = tab.python_widget.filePath()
    assert wait_until(lambda: not dock.is_busy() and tab.engine_status.text() != "checking...", 120)
    facts["status"], facts["status_style"] = tab.engine_status.text(), tab.engine_status.styleSheet()
    facts["doctor"] = tab.doctor_view.toPlainText()[:3000]
    # segment a raster layer with the new engine
    assert wait_until(lambda: bool(dock.catalog.models) and not dock.catalog.busy(), 120), "no models listed"
    facts["models"] = [m.key for m in dock.catalog.models]
    layer = QgsRasterLayer(sar_example_in_utm(WORK), "ssdd")
    QgsProject.instance().addMapLayer(layer)
    dock.select_model("ssdd-ship")
    dock.set_checked_rasters([layer.id()])
    dock.segment_tab.output_widget.setFilePath("")
    finished: list = []
    dock.runFinished.connect(finished.append)
    dock.segment_tab.segment_button.click()
    assert wait_until(lambda: bool(finished), 300), "segment did not finish"
    facts["segment_ok"], facts["segment_message"] = finished[-1].ok, finished[-1].message
    facts["segment_command"] = [line for line in dock.log_view.toPlainText().splitlines() if "segment" in line][:3]
    facts["layers"] = []
    for lyr in QgsProject.instance().mapLayers().values():
        if isinstance(lyr, QgsVectorLayer):
            renderer = lyr.renderer()
            facts["layers"].append({
                "name": lyr.name(), "features": lyr.featureCount(), "crs": lyr.crs().authid(),
                "renderer": renderer.type(), "class_attribute": getattr(renderer, "classAttribute", lambda: None)(),
                "categories": [c.value() for c in getattr(renderer, "categories", lambda: [])()]})


def fail() -> None:
    old_python = str(ROOT / ".venv" / "bin" / "python")  # a working older engine the user had set
    tab.python_widget.setFilePath(old_python)
    old_engine = settings.engine_home() / "engine"
    (old_engine / "bin").mkdir(parents=True)
    (old_engine / "marker").write_text("old engine")
    only_uv = Path(WORK) / "only-uv"
    only_uv.mkdir()
    for whl in glob.glob(os.path.join(WHEELS, "uv-*.whl")):
        os.link(whl, only_uv / os.path.basename(whl))
    empty = Path(WORK) / "empty"
    empty.mkdir()
    unreachable_index()
    cases = [("no_network_no_uv", ""), ("empty_folder", str(empty)), ("lacking_folder", str(only_uv)),
             ("no_network", ""), ("cancelled", WHEELS), ("damaged_wheel", WHEELS)]
    (bundled,) = glob.glob(os.path.join(PROFILE, "python", "plugins", package, "wheels", "*.whl"))
    good_wheel = Path(bundled).read_bytes()
    facts["cases"] = {}
    for name, folder in cases:
        if name == "damaged_wheel":  # the wheel inside the installed plugin is damaged
            Path(bundled).write_bytes(b"not a zip file")
        on_step = None
        if name == "cancelled":  # Cancel while uv installs the engine
            def on_step(title: str) -> None:
                if title == "installing the engine":
                    tab.cancel_install_button.click()
        result, messages, seconds = click_install(folder, on_step)
        facts["cases"][name] = {
            "ok": result.ok if result else None, "message": result.message if result else None,
            "bar": messages, "seconds": seconds, "setting": settings.engine_python(), "temps": temps(),
            "marker": (old_engine / "marker").read_text() if (old_engine / "marker").exists() else None,
            "field": tab.python_widget.filePath(), "install_enabled": tab.install_button.isEnabled(),
            "uv_there": (settings.engine_home() / "tools" / "uv" / "bin" / "uv").is_file()}
    facts["old_python"] = old_python
    # QGIS and the old engine still work: Check engine with the old setting turns green
    tab.check_engine()
    assert wait_until(lambda: not dock.is_busy(), 120)
    facts["status_after"], facts["status_style"] = tab.engine_status.text(), tab.engine_status.styleSheet()
    # the plugin unloaded while an install runs: its process ends, its temp env goes (checked after unload)
    Path(bundled).write_bytes(good_wheel)
    tab.wheel_folder_widget.setFilePath(WHEELS)
    tab.install_button.click()
    facts["installing_at_unload"] = wait_until(lambda: "installing the engine" in tab.install_status.text(), 60)


{"units": units, "install": install, "fail": fail}[SCENARIO]()
plugin.unload()
flush_deletes()
facts["processes_left"] = len(iface.window.findChildren(QProcess))
facts["children_left"] = child_processes()
facts["temps_after_unload"] = temps()
facts["install_modules_loaded"] = sorted(m for m in ("uv", "onnxruntime", "pyogrio", "shapely") if m in sys.modules)
report(facts)
