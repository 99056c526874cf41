"""A long-lived ``rs-engine serve`` process for interactive prompts (the Outline map tool).

The protocol (DESIGN.md, JSON lines): once its model is loaded the server prints ``{"event": "ready", "model",
"classes", "gsd", "tile_size", "bands"}``; then it answers each request line on stdin (``prompt``, ``embed``) with
one line on stdout carrying the request's ``id``: ``outline``, ``embedded`` or ``error`` (it keeps running after an
error). ``{"op": "quit"}`` gets ``{"event": "bye"}`` and exit 0; EOF on stdin ends it too. A model that fails to load:
an ``error`` event and exit 2. Its stderr is its log, relayed to the QGIS message log.

The process is started by the first request (or :meth:`ServeClient.start`, to load the model ahead of the first
click) and ended by :meth:`ServeClient.stop`: quit, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from qgis.core import Qgis
from qgis.PyQt.QtCore import QObject, QProcess, pyqtSignal

from .engine import engine_process, log
from .settings import EngineCommand, EngineNotFound, engine_command


class ServeError(RuntimeError):
    """The serve process could not start, stopped, timed out, or answered a request with an error event."""


class ServeClient(QObject):
    """One ``rs-engine serve --model MODEL`` process and its request / reply lines.

    Signals: ``ready(dict)`` once the model is loaded (the ready event); ``replied(dict)`` per reply to a request
    (``outline``, ``embedded``, or ``error``, also the synthetic error every pending request gets when the process
    ends); ``stopped(str)`` when the process has ended: '' when :meth:`stop` asked for it, else why.
    """

    ready = pyqtSignal(dict)
    replied = pyqtSignal(dict)
    stopped = pyqtSignal(str)

    def __init__(self, model: str, device: str = "auto", parent: QObject | None = None,
                 command: EngineCommand | None = None, threads: int | None = None) -> None:
        """``model``: what ``--model`` takes (bundled name or file path); ``command``: a resolved command (default:
        :func:`~.settings.engine_command` for ``rs-engine``, as :class:`~.engine.EngineJob` does)."""
        super().__init__(parent)
        self.model, self.device, self.threads = model, device, threads
        self._command = command
        self._proc: QProcess | None = None
        self._out_buf = b""
        self._err_buf = b""
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._queued: list[dict[str, Any]] = []  # written once the model is loaded
        self._pending: set[int] = set()
        self._replies: dict[int, dict[str, Any]] = {}  # kept for request(): the ids it waits for
        self._waiting: set[int] = set()
        self._next_id = 1
        self._stopping = False
        self._start_error = ""
        self.info: dict[str, Any] | None = None  # the ready event
        self.end_reason: str | None = None  # set when the process has ended ('' when asked to)

    # -- process -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process (no-op while it runs); the model loads in the background, ``ready`` follows.

        Raises:
            ServeError: no engine is configured or found (the message says where to set it).
        """
        if self.is_running():
            return
        try:
            command = self._command or engine_command("rs-engine")
        except EngineNotFound as exc:
            raise ServeError(str(exc)) from None
        args = ["serve", "--model", self.model, "--device", self.device]
        if self.threads:
            args += ["--threads", str(self.threads)]
        self._proc = proc = engine_process(command, self)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self.info, self.end_reason, self._stopping, self._start_error = None, None, False, ""
        argv = command.argv(args)
        log("serve: " + " ".join(argv))
        proc.start(argv[0], argv[1:])
        if self.end_reason:  # failed to start at once (no such program)
            raise ServeError(self.end_reason)

    def is_running(self) -> bool:
        """True while the process runs (or starts)."""
        return self._proc is not None and self._proc.state() != QProcess.NotRunning

    def is_ready(self) -> bool:
        """True once the model is loaded and the process still runs."""
        return self.info is not None and self.is_running()

    def pid(self) -> int:
        """The process id (0 when not running)."""
        return int(self._proc.processId()) if self.is_running() else 0

    def stop(self, timeout_s: float = 5) -> None:
        """End the process: ``quit``, then SIGTERM after ``timeout_s``, then SIGKILL 2 s later. Blocks until it has
        ended (plugin unload, model change); pending requests get an error reply."""
        if not self.is_running():
            return
        self._stopping = True
        proc = self._proc
        if proc.state() == QProcess.Starting:
            proc.waitForStarted(int(timeout_s * 1000))
        if proc.state() == QProcess.Running:
            proc.write(b'{"op": "quit"}\n')
            proc.closeWriteChannel()  # EOF ends a server still loading its model too
        if not proc.waitForFinished(int(timeout_s * 1000)):
            log("serve did not quit: terminating it", Qgis.Warning)
            proc.terminate()
            if not proc.waitForFinished(2000):
                proc.kill()
                proc.waitForFinished(2000)

    # -- requests ------------------------------------------------------------------------------------------
    def send(self, request: dict[str, Any]) -> int:
        """Send one request (a copy gets a fresh ``id``), starting the process when needed; returns the id. The
        reply comes with ``replied``; requests made while the model loads are written once it is ready.

        Raises:
            ServeError: the process could not be started.
        """
        self.start()
        request = dict(request, id=self._next_id)
        self._next_id += 1
        self._pending.add(request["id"])
        if self.info is not None:
            self._write(request)
        else:
            self._queued.append(request)
        return request["id"]

    def request(self, request: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        """Send a request and block until its reply (the process's output is pumped in this thread, as
        :meth:`~.engine.EngineJob.wait` does); returns the reply (``outline`` or ``embedded`` event).

        Raises:
            ServeError: an error reply (its message), the process ended, or no reply within ``timeout_s``.
        """
        request_id = self.send(request)
        self._waiting.add(request_id)
        try:
            deadline = time.monotonic() + timeout_s
            while request_id not in self._replies:
                if time.monotonic() > deadline:
                    raise ServeError(f"the engine did not answer within {timeout_s:g} s")
                if self._proc is None or self._proc.state() == QProcess.NotRunning:
                    # finished() may not have been delivered yet: its handler fails the pending requests
                    if self._proc is not None and self.end_reason is None:
                        self._on_finished(self._proc.exitCode(), self._proc.exitStatus())
                    if request_id not in self._replies:
                        raise ServeError(self.end_reason or "the engine is not running")
                    break
                self._proc.waitForReadyRead(50)
            reply = self._replies.pop(request_id)
        finally:
            self._waiting.discard(request_id)
        if reply.get("event") == "error":
            raise ServeError(str(reply.get("message") or "engine error"))
        return reply

    def wait_ready(self, timeout_s: float = 120) -> dict[str, Any]:
        """Start the process if needed and block until the model is loaded; returns the ready event.

        Raises:
            ServeError: the model failed to load, the process ended, or ``timeout_s`` passed.
        """
        self.start()
        deadline = time.monotonic() + timeout_s
        while self.info is None:
            if not self.is_running():
                if self._proc is not None and self.end_reason is None:
                    self._on_finished(self._proc.exitCode(), self._proc.exitStatus())
                raise ServeError(self.end_reason or "the engine is not running")
            if time.monotonic() > deadline:
                raise ServeError(f"the engine did not load its model within {timeout_s:g} s")
            self._proc.waitForReadyRead(50)
        return self.info

    # -- output --------------------------------------------------------------------------------------------
    def _write(self, request: dict[str, Any]) -> None:
        self._proc.write((json.dumps(request) + "\n").encode("utf-8"))

    def _read_stdout(self) -> None:
        if self._proc is None:
            return
        self._out_buf += bytes(self._proc.readAllStandardOutput())
        *lines, self._out_buf = self._out_buf.split(b"\n")
        for raw in lines:
            self._stdout_line(raw.decode("utf-8", errors="replace").strip())

    def _stdout_line(self, line: str) -> None:
        try:
            event = json.loads(line) if line.startswith("{") else None
        except ValueError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            if line:
                log(f"serve: {line}")
            return
        kind, request_id = event["event"], event.get("id")
        if kind == "ready":
            self.info = event
            queued, self._queued = self._queued, []
            for request in queued:
                self._write(request)
            self.ready.emit(event)
        elif request_id in self._pending:
            self._deliver(event)
        elif kind == "error":  # not about a request: the model failed to load, or a line it could not parse
            self._start_error = str(event.get("message", ""))
            log(f"serve: {self._start_error}", Qgis.Warning)

    def _deliver(self, reply: dict[str, Any]) -> None:
        self._pending.discard(reply.get("id"))
        if reply.get("id") in self._waiting:
            self._replies[reply["id"]] = reply
        self.replied.emit(reply)

    def _read_stderr(self) -> None:
        if self._proc is None:
            return
        self._err_buf += bytes(self._proc.readAllStandardError())
        *lines, self._err_buf = self._err_buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").split("\r")[-1].rstrip()
            if line:
                self._stderr_tail.append(line)
                log(f"serve: {line}", Qgis.Warning if line.startswith(("WARNING", "ERROR")) else Qgis.Info)

    # -- end -----------------------------------------------------------------------------------------------
    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and self.end_reason is None:  # no finished() follows
            program = self._proc.program() if self._proc else "rs-engine"
            self._finish(f"could not start the engine ({program}): "
                         f"{self._proc.errorString() if self._proc else ''}; check Delineate > Settings")

    def _on_finished(self, exit_code: int, status: QProcess.ExitStatus) -> None:
        if self.end_reason is not None:
            return
        self._read_stdout()
        self._read_stderr()
        if self._stopping:
            self._finish("")
            return
        if status == QProcess.CrashExit:  # killed: its last log line says nothing about why
            self._finish("engine stopped unexpectedly (killed or crashed)")
            return
        detail = self._start_error or (self._stderr_tail[-1] if self._stderr_tail else "")
        self._finish(f"engine stopped unexpectedly (exit {exit_code})" + (f": {detail}" if detail else ""))

    def _finish(self, reason: str) -> None:
        """The process has ended (or never started): fail what is pending, then ``stopped``."""
        self.end_reason = reason
        self.info = None
        log(f"serve ended{': ' + reason if reason else ''}", Qgis.Warning if reason else Qgis.Info)
        self._queued.clear()
        for request_id in sorted(self._pending):
            self._deliver({"event": "error", "id": request_id, "message": reason or "the engine was stopped"})
        self.stopped.emit(reason)
