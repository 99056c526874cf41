"""Install engine (issue 15) in real QGIS: Debian's PyQGIS, offscreen, a fresh profile, the plugin installed from
its zip (which bundles this checkout's delineate wheel). Each scenario of install_scenarios.py runs in its own QGIS
process under /usr/bin/python3 and prints one JSON line of facts; the assertions are here.

The wheel folder (tests/light_env.py: the delineate wheel, its light dependencies, uv) is the offline install
source; the package index is a closed port in the QGIS processes, so nothing comes from the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QGIS_PYTHON = "/usr/bin/python3"
sys.path.insert(0, str(ROOT / "tests"))

from light_env import wheel_folder  # noqa: E402

pytestmark = pytest.mark.skipif(
    subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True).returncode != 0,
    reason="PyQGIS missing (make test installs python3-qgis)")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline install source: this checkout's delineate wheel, its light dependencies, uv."""
    return wheel_folder(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def plugin_zip(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin zip as `make plugin` builds it, with the wheel of the folder bundled."""
    (wheel,) = wheels.glob("delineate-*.whl")
    out = tmp_path_factory.mktemp("zip") / "delineate.zip"
    subprocess.run([QGIS_PYTHON, str(ROOT / "qgis_plugin" / "build_zip.py"), str(out), "--wheel", str(wheel)],
                   check=True, capture_output=True)
    return out


def _env(tmp: Path) -> dict[str, str]:
    """A QGIS process's environment: offscreen, its temporary files and uv's cache under ``tmp``, no repository
    engine on PATH (the installed one must be what runs), no pip or uv configuration of this machine."""
    (tmp / "tmp").mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not p.startswith(str(ROOT / ".venv")))
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1", GDAL_PAM_ENABLED="NO", PATH=path,
               TMPDIR=str(tmp / "tmp"), XDG_RUNTIME_DIR=str(tmp / "tmp"))
    for name in [n for n in env if n.startswith(("PIP_", "UV_"))] + ["PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"]:
        env.pop(name, None)
    # this machine's pip.conf adds wheel folders and indexes: only the test's sources may be seen
    env.update(PIP_CONFIG_FILE=os.devnull, UV_CACHE_DIR=str(tmp / "uv-cache"))
    return env


def _scenario(name: str, zip_path: Path, wheels: Path, workdir: Path, timeout: int = 900) -> dict:
    r = subprocess.run([QGIS_PYTHON, str(HERE / "install_scenarios.py"), name, str(zip_path), str(wheels),
                        str(workdir)], capture_output=True, text=True, timeout=timeout, env=_env(workdir),
                       cwd=str(workdir))
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    (workdir / "facts.json").write_text(json.dumps(facts, indent=1))  # kept with pytest's tmp_path, to read
    assert facts["engine_modules_loaded"] == [], "the plugin must never import the engine's stack"
    assert facts["processes_left"] == 0 and facts["children_left"] == []
    assert facts["temps_after_unload"] == [], "a temporary environment was left after unload"
    assert facts["install_modules_loaded"] == [], "nothing the installer installs may be imported into QGIS"
    return facts


def test_plugin_zip_bundles_the_engine_wheel(plugin_zip: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(plugin_zip).namelist()
    assert "delineate/installer.py" in names
    bundled = [n for n in names if n.startswith("delineate/wheels/")]
    assert bundled == ["delineate/wheels/delineate-0.1.0-py3-none-any.whl"]
    bare = tmp_path / "bare.zip"
    subprocess.run([QGIS_PYTHON, str(ROOT / "qgis_plugin" / "build_zip.py"), str(bare), "--no-wheel"], check=True,
                   capture_output=True)
    assert not [n for n in zipfile.ZipFile(bare).namelist() if "/wheels/" in n]


def test_installer_units(plugin_zip: Path, wheels: Path, tmp_path: Path) -> None:
    """The installer's pieces: QGIS's Python, the steps' command lines, the messages, replacing an engine."""
    f = _scenario("units", plugin_zip, wheels, tmp_path)
    assert f["plugin_file"].endswith("/python/plugins/delineate/__init__.py"), "not the plugin from the zip"
    assert f["qgis_python_here"] == "/usr/bin/python3.11"  # Debian's, that QGIS runs
    assert f["qgis_python_binary"] == str(tmp_path / "units" / "usr" / "bin" / "python3.11")
    assert f["qgis_python_shim"] == f["qgis_python_binary"], "sys.executable outside QGIS's prefix was preferred"
    assert f["qgis_python_named"] == str(tmp_path / "units" / "shims" / "python3")  # the last resort
    assert f["qgis_python_windows"] == str(tmp_path / "units" / "win" / "python.exe")
    assert f["qgis_python_missing"] is None
    assert f["venv_python"] == ["/e/bin/python", "/e/Scripts/python.exe"]
    home = tmp_path / "units" / "home"
    (pip, pip_argv, pip_clean), (_, venv, _), (_, install, _), (_, doctor, _) = f["steps_offline"]
    assert pip == "getting uv" and not pip_clean
    assert pip_argv == ["/usr/bin/python3", "-m", "pip", "install", "--upgrade", "--no-warn-script-location",
                        "--target", str(home / "tools" / "uv"), "--no-index", "--find-links",
                        str(tmp_path / "units" / "wheels"), "uv==0.13.9"]
    temp = str(home / f"engine.tmp-{venv[-1].rsplit('-', 1)[1]}")
    assert venv == [str(home / "tools/uv/bin/uv"), "venv", "--no-project", "--no-config", "--relocatable",
                    "--python", "/usr/bin/python3", temp]
    wheel_uri = (tmp_path / "units" / "delineate-0.1.0-py3-none-any.whl").as_uri()
    assert install == [str(home / "tools/uv/bin/uv"), "pip", "install", "--no-config", "--python", temp + "/bin/python",
                       "--link-mode", "copy", "--compile-bytecode", "--offline", "--no-index", "--find-links",
                       str(tmp_path / "units" / "wheels"), f"delineate @ {wheel_uri}"]
    assert doctor == [temp + "/bin/python", "-m", "rs_engine.cli", "doctor"]
    full_install = f["steps_online_full"][2][1]
    assert full_install[-1] == f"delineate[train,openvino] @ {wheel_uri}"
    assert "--no-index" not in full_install and "--retries" in f["steps_online_full"][0][1]
    win_pip, win_venv, win_install, win_doctor = f["steps_windows"]
    assert win_venv[0] == str(home / "tools/uv/Scripts/uv.exe") and win_install[-1] == "delineate"
    assert win_doctor[0].endswith("/Scripts/python.exe")
    assert f["steps_with_uv"] == ["creating the environment", "installing the engine", "checking the engine"]
    assert f["msg_missing"].startswith(f"Install engine failed: the local wheel folder {tmp_path}/units/wheels lacks")
    assert "(uv: No solution found" in f["msg_missing"] and "rasterio was not found" in f["msg_missing"]
    assert "lacks wheels" in f["msg_pip_missing"] and "(pip: ERROR: No matching distribution" in f["msg_pip_missing"]
    assert f["msg_network"].startswith("Install engine failed: no network (the package index cannot be reached) "
                                       "and no local wheel folder (uv: error: Failed to fetch")
    assert f["msg_damaged"].startswith("Install engine failed: a wheel is damaged")
    assert f["replaced"] == ["new", "engine"] and f["replace_missing"] == ["new", "engine"]


def test_install_engine_from_wheel_folder_then_segment(plugin_zip: Path, wheels: Path, tmp_path: Path) -> None:
    """Settings > Install engine, offline from the wheel folder, in a fresh profile with the plugin from its zip:
    the engine lands in the profile, Check engine turns green, and a raster layer is segmented into a styled
    layer by it (the light engine: ONNX Runtime, no PyTorch)."""
    f = _scenario("install", plugin_zip, wheels, tmp_path)
    assert "not found" in f["engine_before"], "an engine was there before the install"
    assert f["ok"], (f["message"], f["install_log"])
    assert f["steps"] == ["getting uv", "creating the environment", "installing the engine", "checking the engine"]
    assert f["cancel_enabled_while_running"] == [True] and f["progress_max"] == 100
    python = f["engine_python"]
    assert python.endswith("/delineate/engine/bin/python") and f["setting"] == python == f["field_shows"]
    assert f["temps"] == [], "the temporary environment must be gone"
    assert [m for m, _level in f["bar"]][0] == f"engine installed: {python}"
    assert "onnxruntime" in f["engine_packages"] and "rs_engine" in f["engine_packages"]
    assert "torch" not in f["engine_packages"], "the light engine must not bring PyTorch"
    assert f["status"] == "engine OK" and "#1a7f37" in f["status_style"], (f["status"], f["doctor"])
    assert {"ssdd-ship", "nwpu10"} <= set(f["models"])
    assert f["segment_ok"], (f["segment_message"], f["segment_command"])
    (layer,) = f["layers"]
    assert layer["name"] == "ssdd - ssdd-ship" and layer["crs"] == "EPSG:32616"
    assert 12 <= layer["features"] <= 40  # 24 ships annotated
    assert layer["renderer"] == "categorizedSymbol" and layer["class_attribute"] == "class_name"
    assert layer["categories"] == ["ship"]


def test_failed_installs_keep_the_old_engine(plugin_zip: Path, wheels: Path, tmp_path: Path) -> None:
    """No network, a wheel folder lacking wheels, a damaged wheel in the plugin: each install fails with one clear
    message; the old engine setting and the old engine folder stay, no temporary environment is left, QGIS and
    the old engine keep working."""
    f = _scenario("fail", plugin_zip, wheels, tmp_path)
    expected = {
        "no_network_no_uv": "Install engine failed: no network (the package index cannot be reached) and no local "
                            "wheel folder (pip: ",
        "empty_folder": f"Install engine failed: the local wheel folder {tmp_path}/empty lacks wheels",
        "lacking_folder": f"Install engine failed: the local wheel folder {tmp_path}/only-uv lacks wheels",
        "no_network": "Install engine failed: no network (the package index cannot be reached) and no local "
                      "wheel folder (uv: ",
        "cancelled": "Install engine cancelled",
        "damaged_wheel": "Install engine failed: a wheel is damaged",
    }
    for name, start in expected.items():
        case = f["cases"][name]
        assert case["ok"] is False and case["message"].startswith(start), (name, case["message"])
        level = 1 if name == "cancelled" else 2  # Qgis.Warning, Qgis.Critical
        assert len(case["bar"]) == 1 and case["bar"][0] == [case["message"], level], (name, case["bar"])
        assert "\n" not in case["message"] and len(case["message"]) < 500
        assert case["setting"] == case["field"] == f["old_python"], name
        assert case["marker"] == "old engine", f"{name}: the old engine folder was touched"
        assert case["temps"] == [], f"{name}: a temporary environment was left"
        assert case["install_enabled"], name
    assert not f["cases"]["empty_folder"]["uv_there"] and f["cases"]["lacking_folder"]["uv_there"]
    assert "rasterio" in f["cases"]["lacking_folder"]["message"] or "not found" in f["cases"]["lacking_folder"][
        "message"]
    cancelled = f["cases"]["cancelled"]
    assert cancelled["ok"] is False and f["cancel_enabled_while_running"][4]
    assert cancelled["seconds"] < 5, "Cancel must stop the running step, not wait for it"
    assert f["status_after"] == "engine OK" and "#1a7f37" in f["status_style"]
    assert f["installing_at_unload"], "the unload should happen while an install runs"


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("qgis") and shutil.which("xvfb-run")),
                    reason="QGIS desktop or xvfb-run missing (apt-get install qgis xvfb)")
def test_desktop_install_engine_screenshot(wheels: Path, tmp_path: Path) -> None:
    """The real QGIS desktop under Xvfb (where sys.executable is whatever python3 PATH gives, not QGIS's): Install
    engine from the wheel folder builds the engine from QGIS's own Python and Check engine turns green; the
    screenshot of the Settings tab is saved (docs/img/install-engine.png is made by the same script)."""
    png = tmp_path / "install.png"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run([QGIS_PYTHON, str(HERE / "desktop_run.py"), str(png), "--install-from", str(wheels)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert "delineate" in facts["plugins"] and facts["ok"], facts
    assert facts["qgis_python"] == "/usr/bin/python3.11", facts  # Debian's, the one QGIS runs
    assert facts["status"] == "engine OK" and "#1a7f37" in facts["status_style"]
    assert facts["saved"] and 20_000 < png.stat().st_size < 150_000
