"""Start the real QGIS desktop under Xvfb with the plugin installed from its zip and run desktop_scenario.py.

``python3 tests/qgis/desktop_run.py OUT.png [RASTER]`` (default raster: examples/spacenet_atlanta.tif). Prints the
scenario's facts as one JSON line. ``docs/img/dock.png`` is made with ``python3 tests/qgis/desktop_run.py
docs/img/dock.png``. Needs ``qgis`` and ``xvfb-run`` (apt-get install qgis xvfb).

``--install-from WHEELS`` runs desktop_install_scenario.py instead: no engine set, the plugin zip bundles the
delineate wheel of WHEELS, and Settings > Install engine installs from WHEELS offline (the package index is a closed
port); ``docs/img/install-engine.png`` is made with ``--install-from`` a folder from tests/light_env.py's
``wheel_folder``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qgis_profile import ROOT, make_profile  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("png", type=Path)
    parser.add_argument("raster", type=Path, nargs="?", default=ROOT / "examples" / "spacenet_atlanta.tif")
    parser.add_argument("--install-from", type=Path, metavar="WHEELS")
    args = parser.parse_args(argv)
    png, raster, wheels = args.png.resolve(), args.raster.resolve(), args.install_from
    with tempfile.TemporaryDirectory(prefix="delineate-desktop-") as tmp:
        extra, script = {}, "desktop_scenario.py"
        if wheels is None:
            profiles = make_profile(Path(tmp), str(ROOT / ".venv" / "bin" / "python"))
        else:
            (wheel,) = wheels.resolve().glob("delineate-*.whl")
            profiles = make_profile(Path(tmp), "", wheel=wheel)
            script = "desktop_install_scenario.py"
            path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                   if not p.startswith(str(ROOT / ".venv")))  # no engine but the installed one
            closed = "http://127.0.0.1:9/simple"
            extra = dict(DELINEATE_WHEELS=str(wheels.resolve()), UV_CACHE_DIR=str(Path(tmp) / "uv-cache"), PATH=path,
                         PIP_INDEX_URL=closed, UV_DEFAULT_INDEX=closed, PIP_CONFIG_FILE=os.devnull)
        facts_path = Path(tmp) / "facts.json"
        env = dict(os.environ, DELINEATE_RASTER=str(raster), DELINEATE_SCREENSHOT=str(png),
                   DELINEATE_FACTS=str(facts_path), OMP_NUM_THREADS="1", QT_QPA_PLATFORM="xcb",
                   GDAL_PAM_ENABLED="NO", XDG_RUNTIME_DIR=tmp, TMPDIR=tmp, **extra)
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        for name in [n for n in env if n.startswith(("PIP_", "UV_")) and n not in extra] if wheels else []:
            env.pop(name)  # this machine's pip / uv settings (wheel folders, indexes) must not help the install
        qgis = shutil.which("qgis.bin", path="/usr/bin") or shutil.which("qgis")
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1500x940x24", qgis, "--profiles-path", str(profiles),
               "--profile", "default", "--nologo", "--noversioncheck", "--skipbadlayers",
               "--code", str(Path(__file__).with_name(script))]
        png.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp)
        if not facts_path.exists():
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            return 1
        sys.stdout.write(json.dumps(json.loads(facts_path.read_text())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
