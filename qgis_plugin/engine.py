"""Run the engine (``rs-engine``) or the trainer (``rs-train``) in their own process and follow them.

One class, :class:`EngineJob`, serves the dock (asynchronous: Qt signals, QGIS stays responsive) and the
Processing algorithms (synchronous: :meth:`EngineJob.wait` pumps the process in the algorithm's thread, honouring
``feedback.isCanceled()``). The contract it relies on (DESIGN.md): with ``--progress jsonl`` the tools print one
JSON object per line on stdout (``progress``, ``epoch``, ``done``, ``error`` events); exit codes 0 done, 2 bad
input (one line on stderr), 1 internal error, 130 cancelled (SIGTERM). Cancel sends SIGTERM (``terminate``) and
kills the process when it has not ended ``kill_timeout_ms`` later.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from qgis.core import Qgis, QgsMessageLog
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

from .settings import EngineCommand, EngineNotFound, engine_command

LOG_TAG = "Delineate"
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


def log(message: str, level: Qgis.MessageLevel = Qgis.Info) -> None:
    """Write to the QGIS message log, tab ``Delineate``."""
    QgsMessageLog.logMessage(message, LOG_TAG, level)


@dataclass
class EngineResult:
    """How a job ended.

    ``ok``: exit 0; ``cancelled``: the user cancelled (exit 130 or killed after Cancel); ``message``: one line for
    the message bar (the engine's error, or "engine stopped unexpectedly (exit N)"); ``done``: the engine's
    ``done`` event (``output``, ``features`` / ``metrics``); ``stdout``: whole stdout when not in jsonl mode.
    """

    ok: bool
    cancelled: bool = False
    exit_code: int | None = None
    message: str = ""
    done: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""


def engine_process(command: EngineCommand, parent: QObject | None = None) -> QProcess:
    """A QProcess (not started) set up to run ``command``: QGIS's own Python variables removed from its
    environment, unbuffered output, the command's working directory."""
    proc = QProcess(parent)
    env = QProcessEnvironment.systemEnvironment()
    for name in ("PYTHONHOME", "PYTHONPATH"):  # QGIS's own Python must not leak into the engine's
        env.remove(name)
    env.insert("PYTHONUNBUFFERED", "1")
    proc.setProcessEnvironment(env)
    if command.workdir:
        proc.setWorkingDirectory(command.workdir)
    return proc


class EngineJob(QObject):
    """One run of ``rs-engine`` / ``rs-train`` in a QProcess.

    Signals: ``engineEvent(dict)`` per JSON line, ``logLine(str)`` per other output line (stderr included),
    ``jobFinished(EngineResult)`` once, whatever happened (also when the process could not start).
    """

    engineEvent = pyqtSignal(dict)
    logLine = pyqtSignal(str)
    jobFinished = pyqtSignal(object)

    def __init__(self, tool: str, args: list[str], parent: QObject | None = None, jsonl: bool = True,
                 kill_timeout_ms: int = 5000, command: EngineCommand | None = None) -> None:
        """``tool``: ``rs-engine`` or ``rs-train``; ``args``: its arguments (``--progress jsonl`` is the
        caller's to add); ``jsonl``: parse stdout lines as events (else keep stdout whole, e.g. ``models --json``);
        ``command``: a resolved command (default: :func:`engine_command` from the settings)."""
        super().__init__(parent)
        self.tool, self.args, self.jsonl, self.kill_timeout_ms = tool, list(args), jsonl, kill_timeout_ms
        self._command = command
        self._proc: QProcess | None = None
        self._out_buf = b""
        self._err_buf = b""
        self._stdout: list[str] = []
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._error_event: str | None = None
        self._done_event: dict[str, Any] = {}
        self._cancel_at: float | None = None
        self._kill_timer: QTimer | None = None
        self._sync = False
        self.result: EngineResult | None = None
        self.pid: int = 0

    # -- control -------------------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the process; False (and ``jobFinished`` with the reason) when it cannot be started."""
        try:
            command = self._command or engine_command(self.tool)
        except EngineNotFound as exc:
            self._finish(EngineResult(ok=False, message=str(exc)))
            return False
        proc = engine_process(command, self)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        proc.started.connect(self._on_started)
        self._proc = proc
        argv = command.argv(self.args)
        log("run: " + " ".join(argv))
        proc.start(argv[0], argv[1:])
        return True

    def is_running(self) -> bool:
        """True while the process runs (or starts)."""
        return self._proc is not None and self._proc.state() != QProcess.NotRunning

    def cancel(self) -> None:
        """Ask the process to stop (SIGTERM: the tools clean up and exit 130); kill it after the timeout."""
        if not self.is_running() or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        self.logLine.emit("cancelling...")
        self._proc.terminate()
        if not self._sync:  # wait() kills it itself (its thread may have no event loop for a timer)
            self._kill_timer = QTimer(self)
            self._kill_timer.setSingleShot(True)
            self._kill_timer.timeout.connect(self._kill)
            self._kill_timer.start(self.kill_timeout_ms)

    def kill(self) -> None:
        """End the process at once (SIGKILL), e.g. when QGIS or the plugin shuts down."""
        if self.is_running():
            if self._cancel_at is None:
                self._cancel_at = time.monotonic()
            self._proc.kill()

    def shutdown(self, timeout_s: float = 10) -> None:
        """End the job for good (plugin unload): no more ``jobFinished``; SIGTERM first (rs-engine removes its
        temporary file, rs-train saves its checkpoint), killed after ``kill_timeout_ms``; then deleted."""
        try:
            self.jobFinished.disconnect()
        except TypeError:  # nothing connected
            pass
        self.cancel()
        self.wait(timeout_s=timeout_s)
        self.deleteLater()

    def wait(self, feedback: Any = None, timeout_s: float | None = None) -> EngineResult:
        """Block until the job ends, pumping its output (signals fire in this thread). ``feedback``
        (QgsFeedback) cancels the job when ``isCanceled()``; ``timeout_s`` kills it after that long."""
        self._sync = True
        if self.result is None and self._proc is not None:
            self._proc.waitForStarted(30000)
        t0 = time.monotonic()
        while self.result is None:
            if self._proc is None:
                break
            if feedback is not None and feedback.isCanceled() and self._cancel_at is None:
                self.cancel()
            if self._cancel_at is not None and time.monotonic() - self._cancel_at > self.kill_timeout_ms / 1000:
                self._proc.kill()
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                self.kill()
            if self._proc.state() == QProcess.NotRunning:
                self._proc.waitForFinished(100)
                if self.result is None:  # finished already delivered nowhere (should not happen)
                    self._on_finished(self._proc.exitCode(), self._proc.exitStatus())
            else:
                self._proc.waitForFinished(100)
        return self.result  # type: ignore[return-value]

    # -- output --------------------------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        if self._proc is None:
            return
        self._out_buf += bytes(self._proc.readAllStandardOutput())
        *lines, self._out_buf = self._out_buf.split(b"\n")
        for raw in lines:
            self._stdout_line(raw.decode("utf-8", errors="replace").rstrip("\r"))

    def _stdout_line(self, line: str) -> None:
        if not self.jsonl:
            self._stdout.append(line)
            return
        if not line.strip():
            return
        if line.lstrip().startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                if event["event"] == "error":
                    self._error_event = str(event.get("message", ""))
                elif event["event"] == "done":
                    self._done_event = event
                self.engineEvent.emit(event)
                return
        self.logLine.emit(line)

    def _read_stderr(self) -> None:
        if self._proc is None:
            return
        self._err_buf += bytes(self._proc.readAllStandardError())
        *lines, self._err_buf = self._err_buf.split(b"\n")
        for raw in lines:
            self._stderr_line(raw.decode("utf-8", errors="replace"))

    def _stderr_line(self, line: str) -> None:
        # tqdm redraws with carriage returns: keep the last state of the line
        line = line.split("\r")[-1].rstrip()
        if line:
            self._stderr_tail.append(line)
            self.logLine.emit(line)

    def _kill(self) -> None:
        if self.is_running():
            log(f"{self.tool} did not stop {self.kill_timeout_ms} ms after SIGTERM: killing it", Qgis.Warning)
            self._proc.kill()

    # -- end -----------------------------------------------------------------------------------------------
    def _on_started(self) -> None:
        self.pid = int(self._proc.processId()) if self._proc else 0

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and self.result is None:
            program = self._proc.program() if self._proc else self.tool
            self._finish(EngineResult(ok=False, message=f"could not start the engine ({program}): "
                                      f"{self._proc.errorString() if self._proc else ''}; check Delineate > "
                                      "Settings"))

    def _on_finished(self, exit_code: int, status: QProcess.ExitStatus) -> None:
        if self.result is not None:
            return
        self._read_stdout()
        self._read_stderr()
        if self._out_buf:
            self._stdout_line(self._out_buf.decode("utf-8", errors="replace"))
            self._out_buf = b""
        if self._err_buf:
            self._stderr_line(self._err_buf.decode("utf-8", errors="replace"))
            self._err_buf = b""
        crashed = status == QProcess.CrashExit
        code = (-exit_code or -1) if crashed else exit_code  # Qt gives the signal number of a crash: -N like Python
        stdout = "\n".join(self._stdout)
        if code == EXIT_OK:
            result = EngineResult(ok=True, exit_code=0, done=self._done_event, stdout=stdout)
        elif self._cancel_at is not None:  # whatever the exit: the user asked for it
            result = EngineResult(ok=False, cancelled=True, exit_code=code, message="cancelled")
        elif code == EXIT_INPUT:
            result = EngineResult(ok=False, exit_code=code, message=self._engine_message() or "bad input")
        elif code == EXIT_CANCELLED:
            result = EngineResult(ok=False, cancelled=True, exit_code=code, message="cancelled")
        else:
            what = f"exit {code}, killed by signal {exit_code}" if crashed and exit_code else f"exit {code}"
            detail = self._engine_message()
            message = f"engine stopped unexpectedly ({what})" + (f": {detail}" if detail else "")
            result = EngineResult(ok=False, exit_code=code, message=message)
        self._finish(result)

    def _engine_message(self) -> str:
        """The engine's one-line error: its jsonl error event, else its last stderr line without the prefix."""
        if self._error_event:
            return self._error_event
        for line in reversed(self._stderr_tail):
            for prefix in (f"{self.tool}: error: ", "rs-engine: error: ", "rs-train: error: "):
                if line.startswith(prefix):
                    return line[len(prefix):]
        return self._stderr_tail[-1] if self._stderr_tail else ""

    def _finish(self, result: EngineResult) -> None:
        if self._kill_timer is not None:
            self._kill_timer.stop()
        self.result = result
        level = Qgis.Info if result.ok or result.cancelled else Qgis.Warning
        log(f"{self.tool} ended: {'ok' if result.ok else result.message}", level)
        self.jobFinished.emit(result)


def remove_partial_outputs(output: str, pid: int | None = None) -> None:
    """Remove what a killed engine left beside ``output`` (``.NAME.tmp-PID.gpkg`` and its -wal/-shm files;
    only those of ``pid`` when given). The engine removes them itself on every exit it survives."""
    folder, name = os.path.split(os.path.abspath(output))
    pattern = glob.escape(f".{name}.tmp-") + (str(pid) if pid else "*") + ".gpkg*"
    for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
        try:
            os.remove(path)
        except OSError as exc:
            log(f"could not remove {path}: {exc}", Qgis.Warning)
