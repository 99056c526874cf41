"""Plugin settings (QgsSettings), how the engine's commands are found, and the Python interpreter QGIS runs.

Keys (all under ``delineate/``):

- ``engine_python``: the Python interpreter of the engine's environment. The engine is then run as
  ``PYTHON -m rs_engine.cli ...`` and training as ``PYTHON -m training.cli ...``.
- ``user_models``: JSON list of model file paths the user added or trained (shown beside the bundled models).

Without ``engine_python``: ``<repository>/.venv/bin/python`` when the plugin runs from the repository (the plugin
folder's parent holds ``.venv``), else the engine "Install engine" put in the profile (:func:`installed_python`),
else ``rs-engine`` / ``rs-train`` found on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qgis.core import QgsSettings

KEY_ENGINE_PYTHON = "delineate/engine_python"
KEY_USER_MODELS = "delineate/user_models"

#: tool name -> (Python module run with ``-m``, console script on PATH)
TOOLS: dict[str, tuple[str, str]] = {
    "rs-engine": ("rs_engine.cli", "rs-engine"),
    "rs-train": ("training.cli", "rs-train"),
}


class EngineNotFound(RuntimeError):
    """Neither a configured engine Python, a repository venv nor the console script on PATH was found."""


@dataclass(frozen=True)
class EngineCommand:
    """A resolved command: ``program`` + ``prefix`` arguments, then the tool's own arguments.

    ``workdir`` is the repository root when the engine runs from it (None: inherit QGIS's working directory).
    """

    program: str
    prefix: tuple[str, ...]
    workdir: str | None = None

    def argv(self, args: list[str]) -> list[str]:
        """The full command line for ``args`` (for logs and ``subprocess``)."""
        return [self.program, *self.prefix, *args]


def plugin_dir() -> Path:
    """The folder of this plugin package (``qgis_plugin/`` in the repository, ``delineate/`` when installed)."""
    return Path(__file__).resolve().parent


def is_python_name(path: str | os.PathLike) -> bool:
    """True for ``python``, ``python3``, ``python3.11``, ``python.exe``... (not ``qgis``, ``qgis-bin.exe``)."""
    return re.fullmatch(r"python(3(\.\d+)?)?(\.exe)?", Path(path).name.lower()) is not None


def qgis_python(executable: str | None = None, base_executable: str | None = None, exec_prefix: str | None = None,
                version: tuple[int, int] | None = None, windows: bool | None = None) -> str | None:
    """The Python interpreter QGIS runs (defaults: this process's ``sys`` values).

    Inside QGIS ``sys.executable`` is not to be trusted: often the QGIS program itself, or whatever ``python3`` is
    first on PATH (seen: a pyenv shim, another Python). So the interpreter is looked for in ``sys.exec_prefix``
    first (``bin/python3.X``, ``bin/python3``, ``bin/python`` on Linux and macOS; ``python.exe`` on Windows, as
    OSGeo4W and the QGIS installers lay it out), then ``sys._base_executable`` and ``sys.executable`` when they are
    named like a Python. None when none of those is a file.
    """
    executable = sys.executable if executable is None else executable
    base_executable = getattr(sys, "_base_executable", "") if base_executable is None else base_executable
    prefix = Path(sys.exec_prefix if exec_prefix is None else exec_prefix)
    major, minor = sys.version_info[:2] if version is None else version
    windows = os.name == "nt" if windows is None else windows
    if windows:
        candidates: list[str | Path] = [prefix / "python.exe", prefix / "python3.exe", prefix / "bin" / "python.exe"]
    else:
        candidates = [prefix / "bin" / f"python{major}.{minor}", prefix / "bin" / "python3", prefix / "bin" / "python"]
    for candidate in [*candidates, base_executable, executable]:
        if candidate and is_python_name(candidate) and os.path.isfile(candidate):
            return str(candidate)
    return None


def venv_python(env: Path, windows: bool | None = None) -> Path:
    """The interpreter of the virtual environment ``env`` (``Scripts/python.exe`` on Windows), existing or not."""
    windows = os.name == "nt" if windows is None else windows
    return env / "Scripts" / "python.exe" if windows else env / "bin" / "python"


def repo_venv_python() -> Path | None:
    """``<repository>/.venv/bin/python`` (or ``Scripts/python.exe``) when the plugin runs from the repository."""
    candidate = venv_python(plugin_dir().parent / ".venv")
    return candidate if candidate.exists() else None


def engine_python() -> str:
    """The configured engine Python path ('' when not set)."""
    return str(QgsSettings().value(KEY_ENGINE_PYTHON, "", type=str) or "").strip()


def set_engine_python(path: str) -> None:
    """Store the engine Python path ('' clears it and restores the automatic choice)."""
    settings = QgsSettings()
    if path.strip():
        settings.setValue(KEY_ENGINE_PYTHON, path.strip())
    else:
        settings.remove(KEY_ENGINE_PYTHON)


def engine_command(tool: str = "rs-engine") -> EngineCommand:
    """Resolve how to run ``tool`` (``rs-engine`` or ``rs-train``).

    Raises:
        EngineNotFound: nothing usable is configured or found; the message says what to set.
    """
    module, script = TOOLS[tool]
    configured = engine_python()
    if configured:
        if not (Path(configured).exists() or shutil.which(configured)):
            raise EngineNotFound(f"engine Python {configured!r} does not exist: fix it in Delineate > Settings")
        return EngineCommand(configured, ("-m", module))
    venv = repo_venv_python()
    if venv is not None:
        return EngineCommand(str(venv), ("-m", module), str(venv.parent.parent.parent))
    installed = installed_python()
    if installed is not None:
        return EngineCommand(str(installed), ("-m", module))
    found = shutil.which(script)
    if found:
        return EngineCommand(found, ())
    raise EngineNotFound(
        f"{script} not found: click Install engine in Delineate > Settings (or pip install delineate and set "
        "its Python there)"
    )


def user_models() -> list[str]:
    """User model file paths, in the order they were added."""
    raw = QgsSettings().value(KEY_USER_MODELS, "[]", type=str) or "[]"
    try:
        paths = json.loads(raw)
    except ValueError:
        return []
    return [str(p) for p in paths if isinstance(p, str)]


def add_user_model(path: str) -> None:
    """Remember a model file (absolute path); adding one twice keeps one entry."""
    path = os.path.abspath(path)
    paths = [p for p in user_models() if p != path] + [path]
    QgsSettings().setValue(KEY_USER_MODELS, json.dumps(paths))


def engine_home() -> Path:
    """The plugin's folder in the QGIS profile, ``<QGIS profile>/delineate``: the installed engine (``engine/``),
    its installer's uv (``tools/uv``) and trained models (``models/``)."""
    from qgis.core import QgsApplication

    return Path(QgsApplication.qgisSettingsDirPath() or Path.home() / ".delineate") / "delineate"


def installed_python() -> Path | None:
    """The Python of the engine "Install engine" made (``<profile>/delineate/engine``), when there is one."""
    candidate = venv_python(engine_home() / "engine")
    return candidate if candidate.exists() else None


def default_models_dir() -> Path:
    """Where trained models go by default: ``<QGIS profile>/delineate/models``."""
    return engine_home() / "models"

