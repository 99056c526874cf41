"""The plugin in real QGIS (Debian's python3-qgis, offscreen), in its own process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QGIS_PYTHON = "/usr/bin/python3"


def _has_qgis() -> bool:
    r = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _has_qgis(), reason="PyQGIS missing (make test installs python3-qgis)")


def test_plugin_loads_and_unloads_cleanly() -> None:
    r = subprocess.run([QGIS_PYTHON, str(Path(__file__).with_name("plugin_smoke.py")), str(ROOT)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert facts["qgis"].startswith("3.")
    assert facts["added"] == facts["actions"] >= 1
    assert facts["removed"] == facts["added"] and facts["left"] == 0
    assert facts["engine_modules_loaded"] == [], "the plugin must never import the engine's stack"


def test_metadata_has_required_fields() -> None:
    import configparser

    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    g = meta["general"]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                "repository"):
        assert g.get(key), key
    assert g["hasProcessingProvider"] == "yes"
    assert g["qgisMinimumVersion"] == "3.22" and g["qgisMaximumVersion"] == "3.99"
