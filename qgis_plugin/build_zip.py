"""Build the plugin zip that QGIS's "Install from ZIP" takes:
``python3 qgis_plugin/build_zip.py [OUT.zip] [--wheel DELINEATE.whl | --no-wheel]``.

The zip holds one top folder ``delineate/`` with the plugin package (``qgis_plugin/*`` without caches and this
script), the repository's ``metadata.txt`` and ``LICENSE`` when there is one, and the engine's wheel
(``delineate/wheels/delineate-VERSION-py3-none-any.whl``) that "Install engine" installs. The wheel is built from
this checkout (``uv build --wheel``, else ``python -m pip wheel --no-deps``) unless ``--wheel`` gives one; when none
can be built the zip is still written, without it, and stderr says so (the plugin then installs ``delineate``
from the package index or a wheel folder). Default output: ``dist/delineate-VERSION.zip``. Standard library only.
"""

from __future__ import annotations

import argparse
import configparser
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
ROOT = PLUGIN_DIR.parent
TOP = "delineate"
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", "wheels"}
SKIP_FILES = {"build_zip.py"}
SKIP_SUFFIXES = {".pyc", ".pyo", ".orig", ".rej", ".swp"}


def plugin_files() -> list[tuple[Path, str]]:
    """(file on disk, name in the zip) for everything the plugin needs, sorted (the wheel aside)."""
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


def _uv() -> str | None:
    """uv beside this Python (a venv's), on PATH, or in the repository's .venv; None without."""
    for candidate in (Path(sys.executable).with_name("uv"), shutil.which("uv"), ROOT / ".venv" / "bin" / "uv"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def build_wheel(out_dir: Path) -> tuple[Path | None, str]:
    """This checkout's ``delineate`` wheel into ``out_dir``: (its path, '') or (None, why not)."""
    commands = []
    uv = _uv()
    if uv:
        commands.append([uv, "build", "--wheel", "--quiet", "--out-dir", str(out_dir), str(ROOT)])
    commands.append([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out_dir),
                     str(ROOT)])
    errors = []
    for cmd in commands:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{Path(cmd[0]).name}: {exc}")
            continue
        wheels = sorted(out_dir.glob("delineate-*.whl"))
        if r.returncode == 0 and wheels:
            return wheels[-1], ""
        lines = (r.stderr or r.stdout).strip().splitlines()
        errors.append(f"{' '.join(cmd[:3])}: {lines[-1] if lines else f'exit {r.returncode}'}")
    return None, "; ".join(errors)


def build(out: Path, wheel: Path | None = None) -> Path:
    """Write the zip to ``out`` (with ``wheel`` as ``delineate/wheels/NAME`` when given) and return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, name in plugin_files():
            zf.write(path, name)
        if wheel is not None:
            zf.write(wheel, f"{TOP}/wheels/{wheel.name}", compress_type=zipfile.ZIP_STORED)  # a zip already
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Build the Delineate QGIS plugin zip.")
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "dist" / f"{TOP}-{version()}.zip")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--wheel", type=Path, help="bundle this delineate wheel instead of building one")
    group.add_argument("--no-wheel", action="store_true", help="bundle no engine wheel")
    args = parser.parse_args(argv)
    if args.no_wheel:
        build(args.out)
    elif args.wheel is not None:
        if not args.wheel.is_file():
            parser.error(f"--wheel {args.wheel}: no such file")
        build(args.out, args.wheel)
    else:
        with tempfile.TemporaryDirectory(prefix="delineate-wheel-") as tmp:
            wheel, why = build_wheel(Path(tmp))
            if wheel is None:
                sys.stderr.write(f"build_zip: no engine wheel bundled (could not build one: {why}); Install engine "
                                 "will take delineate from the package index or a wheel folder\n")
            build(args.out, wheel)
    sys.stdout.write(f"{args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
