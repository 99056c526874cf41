"""A throw-away QGIS profile with the plugin installed from its zip, as "Install from ZIP" does (stdlib only).

``make_profile(root, engine_python)`` -> the profiles folder for ``qgis --profiles-path`` and, as
``QGIS_CUSTOM_CONFIG_PATH``, for ``qgis_process``. The plugin is enabled and its engine Python set.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_profile(root: Path, engine_python: str, python: str = "/usr/bin/python3", wheel: Path | None = None) -> Path:
    """Install the plugin zip into ``root/profiles/default`` and enable it; returns ``root``. ``wheel``: the engine
    wheel to bundle in the zip (None: none, as the tests that use the repository's engine need none)."""
    default = root / "profiles" / "default"
    plugins = default / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    zip_path = root / "delineate.zip"
    bundle = ["--wheel", str(wheel)] if wheel else ["--no-wheel"]
    subprocess.run([python, str(ROOT / "qgis_plugin" / "build_zip.py"), str(zip_path), *bundle], check=True,
                   capture_output=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins)
    ini = default / "QGIS" / "QGIS3.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text(
        "[PythonPlugins]\ndelineate=true\n\n"
        f"[delineate]\nengine_python={engine_python}\n\n"
        "[qgis]\ncheckVersion=false\nshowTips=false\nshowTips322=false\nallowCrashReporting=false\n"
        "[core]\nNewsFeed\\httpsfeedqgisorg\\disabled=true\n",
        encoding="utf-8")
    (root / "profiles" / "profiles.ini").write_text("[core]\ndefaultProfile=default\n", encoding="utf-8")
    return root
