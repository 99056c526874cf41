"""A wheel folder and a fresh light-engine environment, as a QGIS user's machine gets them (issue 15).

:func:`wheel_folder` holds this checkout's ``delineate`` wheel (built now), every wheel of its light dependencies
at the versions of ``requirements-light.lock`` and uv's own wheel: what "Install engine" installs offline from.
The dependency wheels come from the package index once and are cached by the lock's hash (``DELINEATE_TEST_CACHE``,
default ``~/.cache/delineate-tests``). :func:`light_venv` makes a fresh venv from Debian's Python, without system
site-packages, and installs the wheel from that folder only (``--no-index``), timed and measured.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIGHT_LOCK = ROOT / "requirements-light.lock"
UV = Path(sys.executable).with_name("uv")
BASE_PYTHON = "/usr/bin/python3"


def cache_dir() -> Path:
    return Path(os.environ.get("DELINEATE_TEST_CACHE", Path.home() / ".cache" / "delineate-tests"))


def uv_version() -> str:
    out = subprocess.run([str(UV), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def _dependency_wheels() -> Path:
    """The light dependencies' wheels (and uv's), downloaded once per lock content."""
    key = hashlib.sha256(LIGHT_LOCK.read_bytes() + uv_version().encode()).hexdigest()[:16]
    folder = cache_dir() / f"light-deps-{key}"
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--no-deps", "-d", str(tmp)]
    subprocess.run([*pip, "-r", str(LIGHT_LOCK)], check=True)
    subprocess.run([*pip, f"uv=={uv_version()}"], check=True)
    (tmp / ".complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_wheel(out: Path) -> Path:
    """This checkout's ``delineate`` wheel into ``out`` (``uv build``); its path."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("delineate-*.whl"):
        old.unlink()
    subprocess.run([str(UV), "build", "--wheel", "--quiet", "--out-dir", str(out), str(ROOT)], check=True)
    (wheel,) = out.glob("delineate-*.whl")
    return wheel


def wheel_folder(dest: Path) -> Path:
    """``dest`` filled with the delineate wheel, its light dependencies and uv: an offline install source."""
    dest.mkdir(parents=True, exist_ok=True)
    for whl in _dependency_wheels().glob("*.whl"):
        target = dest / whl.name
        if not target.exists():
            os.link(whl, target) if whl.stat().st_dev == dest.stat().st_dev else shutil.copy2(whl, target)
    build_wheel(dest)
    return dest


@dataclass
class LightVenv:
    path: Path
    python: Path
    install_seconds: float
    size_mb: float

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """``rs-engine ARGS`` of this environment (no PyTorch, no system site-packages), run from the venv's folder
        so that the checkout's own ``rs_engine`` is not on the path: the installed wheel is what runs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        return subprocess.run([str(self.path / "bin" / "rs-engine"), *args], capture_output=True, text=True,
                              env=env, cwd=self.path, **kw)


def directory_mb(path: Path) -> float:
    """Disk usage of a folder in MB (files as allocated, hard links once), as ``du -s`` counts it."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def light_venv(dest: Path, wheels: Path) -> LightVenv:
    """A fresh venv at ``dest`` with the light engine installed from ``wheels`` only (no index), timed."""
    start = time.perf_counter()
    subprocess.run([str(UV), "venv", "--quiet", "--python", BASE_PYTHON, str(dest)], check=True)
    python = dest / "bin" / "python"
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(python), "--no-index", "--find-links",
                    str(wheels), "--link-mode", "copy", "--compile-bytecode", "delineate"], check=True)  # as the plugin
    return LightVenv(dest, python, time.perf_counter() - start, directory_mb(dest))
