"""Start the real QGIS desktop under Xvfb with the plugin installed from its zip and run desktop_scenario.py.

``python3 tests/qgis/desktop_run.py OUT.png [RASTER]`` (default raster: examples/spacenet_atlanta.tif). Prints the
scenario's facts as one JSON line. ``docs/img/dock.png`` is made with ``python3 tests/qgis/desktop_run.py
docs/img/dock.png``. Needs ``qgis`` and ``xvfb-run`` (apt-get install qgis xvfb).
"""

from __future__ import annotations

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
    png = Path(argv[0]).resolve()
    raster = Path(argv[1]).resolve() if len(argv) > 1 else ROOT / "examples" / "spacenet_atlanta.tif"
    with tempfile.TemporaryDirectory(prefix="delineate-desktop-") as tmp:
        profiles = make_profile(Path(tmp), str(ROOT / ".venv" / "bin" / "python"))
        facts_path = Path(tmp) / "facts.json"
        env = dict(os.environ, DELINEATE_RASTER=str(raster), DELINEATE_SCREENSHOT=str(png),
                   DELINEATE_FACTS=str(facts_path), OMP_NUM_THREADS="1", QT_QPA_PLATFORM="xcb",
                   GDAL_PAM_ENABLED="NO", XDG_RUNTIME_DIR=tmp, TMPDIR=tmp)
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        qgis = shutil.which("qgis.bin", path="/usr/bin") or shutil.which("qgis")
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1500x940x24", qgis, "--profiles-path", str(profiles),
               "--profile", "default", "--nologo", "--noversioncheck", "--skipbadlayers",
               "--code", str(Path(__file__).with_name("desktop_scenario.py"))]
        png.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp)
        if not facts_path.exists():
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            return 1
        sys.stdout.write(json.dumps(json.loads(facts_path.read_text())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
