"""Plugin settings (QgsSettings) and how the engine's commands are found.

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
import shutil
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


def repo_venv_python() -> Path | None:
    """``<repository>/.venv/bin/python`` (or ``Scripts/python.exe``) when the plugin runs from the repository."""
    root = plugin_dir().parent
    for candidate in (root / ".venv" / "bin" / "python", root / ".venv" / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    return None


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
    env = engine_home() / "engine"
    for candidate in (env / "bin" / "python", env / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    return None


def default_models_dir() -> Path:
    """Where trained models go by default: ``<QGIS profile>/delineate/models``."""
    return engine_home() / "models"

