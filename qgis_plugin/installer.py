"""Install the engine from the plugin (Settings tab, "Install engine"), into the user's QGIS profile.

Nothing here imports the engine: every step is a command line run in its own QProcess, so QGIS never waits.

1. get uv: the Python that QGIS runs does ``pip install --target <profile>/delineate/tools/uv uv==UV_VERSION``
   (only from the local wheel folder when one is given); skipped when that uv is there already.
2. ``uv venv --relocatable --python <QGIS's Python> <profile>/delineate/engine.tmp-PID``: an isolated environment,
   without system site-packages, so QGIS's packages (and its GDAL) never meet the engine's.
3. ``uv pip install --python <temp env> "delineate @ file:///<plugin>/wheels/delineate-*.whl"``: the wheel bundled
   in the plugin zip (``delineate[train,openvino]``, with PyTorch, the training stack and OpenVINO, for the full
   engine), its dependencies from the package index, or from the local wheel folder only (``--offline --no-index
   --find-links``).
4. ``<temp env's python> -m rs_engine.cli doctor`` must succeed.
5. Only then the temp env replaces ``<profile>/delineate/engine`` (an older engine is removed) and the
   ``engine_python`` setting points at it.

On a failure or cancel the temp env is removed, the old engine and the old setting stay as they were, and the
result carries one line for the message bar (the log has every line of every step).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from qgis.core import Qgis
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, pyqtSignal

from . import settings
from .engine import log
from .settings import qgis_python, venv_python

UV_VERSION = "0.13.9"
# Why "train", not "torch": Retrain runs rs-train finetune, which needs the training stack (geopandas, pycocotools,
# matplotlib) besides PyTorch; the train extra includes the torch extra. "openvino": Segment's default runtime
# where it is installed, 2.4x PyTorch end to end on a 2-core CPU (README "Runtimes"); 180 MB beside PyTorch's GBs.
FULL_EXTRA = "train,openvino"
# Why: the engine environment must be built from QGIS's Python, never from a Python uv would download.
UV_ENV = {"UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
          "PYTHONUNBUFFERED": "1"}
NETWORK_ERRORS = ("failed to fetch", "dns error", "connection refused", "network is unreachable", "name resolution",
                  "newconnectionerror", "could not connect", "error sending request", "connect error", "timed out",
                  "connection error", "failed to establish")
MISSING_ERRORS = ("no matching distribution", "from versions: none", "not found in the provided package locations",
                  "no solution found", "not found in the package registry", "because only")
DAMAGED_ERRORS = ("zip", "invalid wheel", "not a valid wheel", "failed to read", "corrupt", "failed to extract",
                  "unpack")


class InstallError(RuntimeError):
    """The install cannot start (QGIS's Python not found, no such wheel folder); the message says why, in one
    line."""


def bundled_wheel(folder: Path | None = None) -> Path | None:
    """The ``delineate`` wheel shipped in the plugin zip (``<plugin>/wheels/``), the newest by name; None without."""
    folder = settings.plugin_dir() / "wheels" if folder is None else folder
    wheels = sorted(folder.glob("delineate-*.whl"))
    return wheels[-1] if wheels else None


@dataclass(frozen=True)
class Step:
    """One command of the install: ``title`` for the progress line, ``argv``, ``tool`` for messages, and
    ``clean_env`` (drop PYTHONHOME / PYTHONPATH: the command runs the engine's environment, not QGIS's)."""

    title: str
    argv: list[str]
    tool: str
    clean_env: bool = True


@dataclass(frozen=True)
class InstallPlan:
    """What to install where. ``home``: ``<profile>/delineate``; ``wheel``: the delineate wheel (None: the package
    ``delineate`` from the folder or the index); ``wheel_folder``: install offline from these wheels only;
    ``full``: add PyTorch, the training stack and OpenVINO (``delineate[train,openvino]``) for retraining."""

    python: str
    home: Path
    wheel: Path | None = None
    wheel_folder: Path | None = None
    full: bool = False
    windows: bool = os.name == "nt"

    @property
    def engine_dir(self) -> Path:
        return self.home / "engine"

    @property
    def temp_dir(self) -> Path:
        return self.home / f"engine.tmp-{os.getpid()}"

    @property
    def uv_dir(self) -> Path:
        return self.home / "tools" / "uv"

    def uv_program(self) -> Path:
        """uv inside ``uv_dir`` (pip ``--target`` puts scripts in ``bin/``, or ``Scripts/`` on Windows)."""
        names = ("Scripts/uv.exe", "bin/uv.exe") if self.windows else ("bin/uv",)
        found = [self.uv_dir / n for n in names if (self.uv_dir / n).is_file()]
        return found[0] if found else self.uv_dir / names[0]

    def has_uv(self) -> bool:
        return (self.uv_dir / f"uv-{UV_VERSION}.dist-info").is_dir() and self.uv_program().is_file()

    def requirement(self) -> str:
        """``delineate`` (or ``delineate[train,openvino]``), from the bundled wheel's file URL when there is one."""
        name = f"delineate[{FULL_EXTRA}]" if self.full else "delineate"
        return f"{name} @ {self.wheel.resolve().as_uri()}" if self.wheel else name

    def steps(self) -> list[Step]:
        """The command lines of steps 1-4 (step 1 only when uv is missing)."""
        local = ["--no-index", "--find-links", str(self.wheel_folder)] if self.wheel_folder else []
        steps = []
        if not self.has_uv():
            pip = [self.python, "-m", "pip", "install", "--upgrade", "--no-warn-script-location", "--target",
                   str(self.uv_dir), *(local or ["--retries", "1", "--timeout", "15"]), f"uv=={UV_VERSION}"]
            # QGIS's own Python runs with QGIS's environment (on Windows it may need its PYTHONHOME)
            steps.append(Step("getting uv", pip, "pip", clean_env=False))
        uv, temp_python = str(self.uv_program()), str(venv_python(self.temp_dir, self.windows))
        steps.append(Step("creating the environment", [uv, "venv", "--no-project", "--no-config", "--relocatable",
                                                        "--python", self.python, str(self.temp_dir)], "uv"))
        # --no-config: a uv.toml of the user's own projects must not change the engine (indexes in UV_* still count)
        # --compile-bytecode: every Segment starts a new engine process; without .pyc files (uv writes none by
        # default, and PYTHONDONTWRITEBYTECODE stops Python writing them) each one recompiles torch/torchvision
        # and the rest from source, seconds per run.
        install = [uv, "pip", "install", "--no-config", "--python", temp_python, "--link-mode", "copy",
                   "--compile-bytecode"]
        if self.wheel_folder:
            install += ["--offline", *local]
        # Why no --torch-backend: PyTorch's own index is another host a firewall may block (it is unreachable
        # here); PyPI's torch brings CUDA libraries, which UV_TORCH_BACKEND=cpu in QGIS's environment avoids.
        steps.append(Step("installing the engine", [*install, self.requirement()], "uv"))
        steps.append(Step("checking the engine", [temp_python, "-m", "rs_engine.cli", "doctor"], "rs-engine doctor"))
        return steps


@dataclass
class InstallResult:
    """How an install ended: ``ok``; ``python`` (the new engine Python); ``message`` (one line for the message
    bar); ``cancelled``; ``log`` (every output line of every step)."""

    ok: bool
    message: str
    python: str = ""
    cancelled: bool = False
    log: list[str] = field(default_factory=list)


def error_detail(lines: list[str]) -> str:
    """The tool's own error in one line: uv's ``error:`` / ``×`` lines with their causes, pip's last ``ERROR:``
    line, else the last non-empty line; at most 300 characters."""
    text = [re.sub(r"^[\s×╰─▶│├]+", "", line).strip() for line in lines]
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*(error:|×)", line)]
    pip_errors = [t for t in text if t.startswith("ERROR:")]
    if starts:
        detail = " ".join(t for t in text[starts[0]:starts[0] + 4] if t)
    elif pip_errors:
        detail = pip_errors[-1]
    else:
        detail = next((t for t in reversed(text) if t), "")
    return detail if len(detail) <= 300 else detail[:297] + "..."


def failure_message(step: Step, lines: list[str], exit_code: int, plan: InstallPlan) -> str:
    """One line for the message bar: what went wrong in words an analyst acts on, then the tool's own error."""
    detail = error_detail(lines)
    low = "\n".join(lines).lower()
    folder = plan.wheel_folder
    if "no module named pip" in low:
        why = "QGIS's Python has no pip (Debian, Ubuntu: apt install python3-pip)"
    elif not folder and any(s in low for s in NETWORK_ERRORS):
        why = "no network (the package index cannot be reached) and no local wheel folder"
    elif any(s in low for s in MISSING_ERRORS):
        why = (f"the local wheel folder {folder} lacks wheels this install needs" if folder
               else "the package index has no matching packages")
    elif step.tool != "rs-engine doctor" and any(s in low for s in DAMAGED_ERRORS):
        why = "a wheel is damaged: download the plugin again or pick another wheel folder"
    elif step.tool == "rs-engine doctor":
        why = "the new engine does not run"
    else:
        why = f"{step.title} failed (exit {exit_code})"
    return f"Install engine failed: {why} ({step.tool}: {detail or 'no output'})"


def replace_engine(temp: Path, engine: Path) -> None:
    """Move the finished environment ``temp`` onto ``engine``; an older engine there is removed afterwards, and
    put back when the move fails. Raises OSError (e.g. Windows: the old engine is in use)."""
    old = engine.with_name(f"{engine.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    had_old = engine.exists()
    if had_old:
        os.replace(engine, old)
    try:
        os.replace(temp, engine)
    except OSError:
        if had_old:
            os.replace(old, engine)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(home: Path) -> None:
    """Remove ``engine.tmp-PID`` / ``engine.old-PID`` folders of processes that are gone (an install killed with
    QGIS); those of a live process (another QGIS installing now) are kept."""
    for path in list(home.glob("engine.tmp-*")) + list(home.glob("engine.old-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # no cheap check: keep it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EngineInstaller(QObject):
    """Runs an :class:`InstallPlan`'s steps one after the other, each in a QProcess.

    Signals: ``stepStarted(str)`` (title), ``progress(int)`` (0-100), ``logLine(str)`` per output line,
    ``installFinished(InstallResult)`` once, whatever happened (the installer is idle again by then).
    """

    stepStarted = pyqtSignal(str)
    progress = pyqtSignal(int)
    logLine = pyqtSignal(str)
    installFinished = pyqtSignal(object)

    def __init__(self, plan: InstallPlan, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.plan = plan
        self.log: list[str] = []
        self._steps: list[Step] = []
        self._index = -1
        self._proc: QProcess | None = None
        self._step_lines: deque[str] = deque(maxlen=60)
        self._buf = b""
        self._cancelled = False
        self.result: InstallResult | None = None

    def start(self) -> None:
        """Begin with step 1 (returns at once); ``installFinished`` reports the end."""
        self.plan.home.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.plan.home)
        shutil.rmtree(self.plan.temp_dir, ignore_errors=True)
        self._steps = self.plan.steps()
        self._line(f"installing the {'full' if self.plan.full else 'light'} engine into {self.plan.engine_dir}"
                   f" from {self.plan.wheel or 'delineate'}"
                   + (f", offline from {self.plan.wheel_folder}" if self.plan.wheel_folder else ""))
        self._next()

    def is_running(self) -> bool:
        return self.result is None and self._index >= 0

    def cancel(self) -> None:
        """Stop the running step (killed: pip and uv leave nothing outside the temp env and uv's cache)."""
        if self.is_running():
            self._cancelled = True
            if self._proc is not None:
                self._proc.kill()

    def shutdown(self) -> None:
        """End for good (plugin unload): no more signals, the step killed, the temp env removed."""
        try:
            self.installFinished.disconnect()
        except TypeError:
            pass
        self.cancel()
        if self._proc is not None:
            self._proc.waitForFinished(5000)
        shutil.rmtree(self.plan.temp_dir, ignore_errors=True)
        self.deleteLater()

    # -- steps ---------------------------------------------------------------------------------------------
    def _next(self) -> None:
        self._index += 1
        total = len(self._steps) + 1
        self.progress.emit(int(100 * self._index / total))
        if self._index == len(self._steps):
            self._promote()
            return
        step = self._steps[self._index]
        self._line(f"{step.title}: " + " ".join(step.argv))
        self._step_lines.clear()
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        if step.clean_env:
            for name in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX"):
                env.remove(name)
        for name, value in UV_ENV.items():
            env.insert(name, value)
        proc.setProcessEnvironment(env)
        # Why: uv would otherwise read a pyproject.toml or .python-version of QGIS's working directory
        proc.setWorkingDirectory(str(self.plan.home))
        proc.setProcessChannelMode(QProcess.MergedChannels)
        proc.readyReadStandardOutput.connect(self._read)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self._proc = proc
        proc.start(step.argv[0], step.argv[1:])
        if self.result is None:  # after start: a cancel from a slot of this signal kills this step
            self.stepStarted.emit(step.title)

    def _read(self) -> None:
        if self._proc is None:
            return
        self._buf += bytes(self._proc.readAllStandardOutput())
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            self._line(raw.decode("utf-8", errors="replace").split("\r")[-1].rstrip(), step=True)

    def _line(self, text: str, step: bool = False) -> None:
        if not text:
            return
        self.log.append(text)
        if step:
            self._step_lines.append(text)
        log(text)
        self.logLine.emit(text)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and self.result is None:
            step = self._steps[self._index]
            reason = self._proc.errorString() if self._proc else ""
            self._fail(f"Install engine failed: could not start {step.argv[0]} ({reason})")

    def _on_finished(self, exit_code: int, status: QProcess.ExitStatus) -> None:
        if self.result is not None:
            return
        self._read()
        if self._buf:
            self._line(self._buf.decode("utf-8", errors="replace").rstrip(), step=True)
            self._buf = b""
        step = self._steps[self._index]
        if self._cancelled:
            self._fail("Install engine cancelled", cancelled=True)
        elif status == QProcess.CrashExit or exit_code != 0:
            self._fail(failure_message(step, list(self._step_lines), exit_code, self.plan))
        else:
            self._next()

    def _promote(self) -> None:
        python = venv_python(self.plan.engine_dir, self.plan.windows)
        try:
            replace_engine(self.plan.temp_dir, self.plan.engine_dir)
        except OSError as exc:
            self._fail(f"Install engine failed: cannot replace {self.plan.engine_dir} ({exc}); close what uses "
                       "the old engine and try again")
            return
        settings.set_engine_python(str(python))
        self.progress.emit(100)
        self._end(InstallResult(True, f"engine installed: {python}", python=str(python), log=self.log))

    def _fail(self, message: str, cancelled: bool = False) -> None:
        shutil.rmtree(self.plan.temp_dir, ignore_errors=True)
        self._end(InstallResult(False, message, cancelled=cancelled, log=self.log))

    def _end(self, result: InstallResult) -> None:
        self.result = result
        self._proc = None
        log(result.message, Qgis.Info if result.ok or result.cancelled else Qgis.Critical)
        self.installFinished.emit(result)


def make_plan(full: bool = False, wheel_folder: str = "", wheel: Path | None = None) -> InstallPlan:
    """The plan for this QGIS: its Python, its profile's ``delineate/`` folder, the bundled wheel.

    Raises:
        InstallError: QGIS's Python is not found, or ``wheel_folder`` is not a folder.
    """
    folder = Path(wheel_folder).expanduser() if wheel_folder.strip() else None
    if folder is not None and not folder.is_dir():
        raise InstallError(f"Install engine failed: the wheel folder {folder} does not exist")
    python = qgis_python()
    if python is None:
        raise InstallError(f"Install engine failed: cannot find the Python interpreter QGIS runs (no python in "
                           f"{sys.exec_prefix}); set the engine Python by hand")
    return InstallPlan(python=python, home=settings.engine_home(), wheel=wheel or bundled_wheel(),
                       wheel_folder=folder, full=full)
