"""Build the plugin zip that QGIS's "Install from ZIP" takes: ``python3 qgis_plugin/build_zip.py [OUT.zip]``.

The zip holds one top folder ``delineate/`` with the plugin package (``qgis_plugin/*`` without caches and this
script), the repository's ``metadata.txt`` and ``LICENSE`` when there is one. Default output:
``dist/delineate-VERSION.zip``. Standard library only.
"""

from __future__ import annotations

import configparser
import sys
import zipfile
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
ROOT = PLUGIN_DIR.parent
TOP = "delineate"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
SKIP_FILES = {"build_zip.py"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp"}


def plugin_files() -> list[tuple[Path, str]]:
    """(file on disk, name in the zip) for everything the plugin needs, sorted."""
    files = []
    for path in sorted(PLUGIN_DIR.rglob("*")):
        rel = path.relative_to(PLUGIN_DIR)
        if not path.is_file() or SKIP_DIRS & set(rel.parts) or path.name in SKIP_FILES:
            continue
        if path.suffix in SKIP_SUFFIXES or path.name.startswith("."):
            continue
        files.append((path, f"{TOP}/{rel.as_posix()}"))
    files.append((ROOT / "metadata.txt", f"{TOP}/metadata.txt"))
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (ROOT / name).is_file():
            files.append((ROOT / name, f"{TOP}/{name}"))
            break
    return files


def version() -> str:
    """The plugin version from metadata.txt."""
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt", encoding="utf-8")
    return meta["general"]["version"]


def build(out: Path) -> Path:
    """Write the zip to ``out`` and return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, name in plugin_files():
            zf.write(path, name)
    return out


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "dist" / f"{TOP}-{version()}.zip"
    build(out)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
