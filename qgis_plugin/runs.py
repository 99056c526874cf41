"""Segment runs, shared by the dock and the Processing algorithms (no widgets here).

A run takes one raster layer through the engine: a raster file goes to the engine as it is; a web or other
non-file raster (XYZ, WMS, ...) is first rendered through QGIS into a temporary GeoTIFF at the model's GSD. Then
``rs-engine segment`` runs in its own process (:class:`~.engine.EngineJob`), and its ``instances`` layer is loaded
and styled. Each step has one place, used by both callers:

- :func:`band_selection` and :func:`plan_run`: the bands the engine gets, the extent, the render;
- :class:`Render` (:class:`RenderTask` runs it in the background for the dock): the rendering;
- :func:`segment_command`: the engine's command line;
- :class:`RunQueue`: runs one after the other, either asynchronously (:meth:`RunQueue.start`, the dock: QGIS stays
  responsive) or blocking in the caller's thread (:meth:`RunQueue.run_blocking`, Processing: its feedback's
  Cancel ends the engine), then loads each result layer (:func:`~.layers.add_result_layer`) when asked to.

Which bands a raster file gives is the engine's decision (a 1-band raster and a 3-band model: it repeats band 1,
as ``--bands 1,1,1``, and says so in one ``WARNING`` line on stderr). Engine lines reach callers through
:attr:`RunQueue.message`, tagged :data:`WARNING` for such notices, so the dock logs them and Processing pushes them
as warnings.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from qgis.core import QgsApplication, QgsFeedback, QgsRasterLayer, QgsRectangle, QgsTask, QgsVectorLayer
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .commands import segment_args, segment_percent
from .engine import EngineJob, EngineResult, remove_partial_outputs
from .layers import (
    LayerError,
    add_result_layer,
    raster_file,
    remove_file,
    render_pipe,
    render_pixel_size,
    result_layer_name,
    safe_name,
    write_pipe,
)
from .models import ModelInfo

DEVICES = ["auto", "cpu", "cuda"]
#: kinds of :attr:`RunQueue.message` lines: the plugin's own, the engine command, the engine's output, a warning
INFO, COMMAND, ENGINE, WARNING = "info", "command", "engine", "warning"


def band_selection(raster_bands: int, model_bands: int, rendered: bool = False) -> str:
    """``--bands`` for a raster and a model. A rendered raster is RGBA: ``1,2,3`` for a 3-band model, band 1 (red)
    repeated for any other. A raster file: '' (the engine's choice: the first bands, or band 1 repeated for a
    1-band raster and a model that takes more, with a notice)."""
    if rendered:
        return ",".join(str(b) for b in ([1, 2, 3] if model_bands == 3 else [1] * model_bands))
    return ""


def engine_line(line: str) -> tuple[str, str]:
    """An engine output line as a :attr:`RunQueue.message` (text, kind): a ``WARNING logger: message`` line (the
    engine's logging on stderr) is a :data:`WARNING` of its message; any other line is :data:`ENGINE`."""
    if line.startswith("WARNING "):
        head, sep, message = line[len("WARNING "):].partition(": ")
        return (message if sep and " " not in head else line[len("WARNING "):]), WARNING
    return line, ENGINE


@dataclass(frozen=True)
class SegmentOptions:
    """The model and engine options of a Segment click or a Processing call, as plain values.

    ``model``: what ``--model`` takes (a bundled name or a file path); ``model_name``: for layer names (the card's
    name, else the file name without extension); ``model_bands`` and ``gsd`` (m/px): from the model card, None
    while it has not been read (only a rendered raster needs them). ``None`` engine options take the card's value.
    """

    model: str
    model_name: str
    model_bands: int | None = None
    gsd: float | None = None
    tile_size: int | None = None
    overlap: int | None = None
    score_threshold: float | None = None
    device: str = "auto"

    @classmethod
    def for_key(cls, key: str, **options: object) -> SegmentOptions:
        """Options for a model known only by its key (the card not read yet)."""
        return cls(model=key, model_name=os.path.splitext(os.path.basename(key))[0] or key, **options)

    def with_card(self, model: ModelInfo) -> SegmentOptions:
        """These options with the model card's name, band count and GSD."""
        return replace(self, model_name=model.name, model_bands=model.bands, gsd=model.gsd)


class Render:
    """The rendering of a non-file raster's extent (in its CRS) into a GeoTIFF at the model's GSD (see
    :func:`~.layers.render_pixel_size`). Build it in the thread that owns the layer (it clones the provider); then
    :meth:`write` may run in any thread.

    Raises:
        LayerError: the layer can't be rendered.
    """

    def __init__(self, layer: QgsRasterLayer, extent: QgsRectangle, gsd: float | None, path: str) -> None:
        self.name, self.crs, self.extent, self.path = layer.name(), layer.crs(), QgsRectangle(extent), path
        self.pixel_size = render_pixel_size(layer, gsd, extent)
        self.pipe = render_pipe(layer)

    def describe(self) -> str:
        """One log line: what is rendered, at what resolution."""
        return f"{self.name}: rendering {self.extent.toString(1)} at {self.pixel_size:g} map units/px"

    def write(self, feedback: QgsFeedback | None = None) -> str:
        """Write the GeoTIFF; returns its path. Raises LayerError (see :func:`~.layers.write_pipe`)."""
        return write_pipe(self.pipe, self.crs, self.extent, self.pixel_size, self.path, feedback, self.name)


class RenderTask(QgsTask):
    """A :class:`Render` in QGIS's task manager (a background thread), cancellable."""

    def __init__(self, render: Render) -> None:
        super().__init__(f"Delineate: render {render.name}", QgsTask.CanCancel)
        self.render = render
        self.error = ""
        self.feedback = QgsFeedback()

    def run(self) -> bool:
        try:
            self.render.write(self.feedback)
        except LayerError as exc:
            self.error = str(exc)
            return False
        except Exception as exc:  # a task must not raise: report it like any failure
            self.error = f"{self.render.name}: rendering failed: {type(exc).__name__}: {exc}"
            return False
        return not self.isCanceled()

    def cancel(self) -> None:
        self.feedback.cancel()
        super().cancel()


@dataclass
class SegmentRun:
    """One raster of a run queue: what to read, where to write, and what came out.

    ``source``: the raster file (None until ``render`` has written it); ``extent``: in the raster's CRS, None for
    the whole raster; ``bands``: ``--bands`` ('' for the engine's choice); ``layer``: the loaded result.
    """

    layer_name: str
    output: str
    temporary_output: bool
    source: str | None
    extent: QgsRectangle | None
    bands: str
    render: Render | None = None
    result: EngineResult | None = None
    layer: QgsVectorLayer | None = None


def plan_run(layer: QgsRasterLayer, options: SegmentOptions, output: str, *, render_dir: str,
             extent: QgsRectangle | None = None, bands: str = "", temporary_output: bool = False) -> SegmentRun:
    """Plan one raster's run: ``extent`` in the layer's CRS (None: the whole raster; a non-file raster is rendered
    over ``extent``, else over its whole extent, into ``render_dir``); ``bands`` as the user gave them ('': see
    :func:`band_selection`). Call it in the thread that owns the layer.

    Raises:
        LayerError: a non-file raster that can't be rendered.
    """
    source = raster_file(layer)
    render = None
    if source is None:
        if options.model_bands is None:
            raise ValueError("a rendered raster needs the model card: SegmentOptions.with_card")
        path = os.path.join(render_dir, f"render_{safe_name(layer.name())}_{uuid.uuid4().hex[:8]}.tif")
        render = Render(layer, extent if extent is not None else layer.extent(), options.gsd, path)
        extent = None
    bands = bands.strip() or band_selection(layer.bandCount(), options.model_bands or 0, rendered=source is None)
    return SegmentRun(layer.name(), output, temporary_output, source, extent, bands, render)


def needs_model_card(layer: QgsRasterLayer) -> bool:
    """True when :func:`plan_run` needs the model card for ``layer`` (a non-file raster: rendered at the GSD)."""
    return raster_file(layer) is None


def segment_command(run: SegmentRun, options: SegmentOptions) -> list[str]:
    """``rs-engine segment`` arguments of a run whose source is a file."""
    extent = run.extent
    return segment_args([run.source], run.output, options.model, tile_size=options.tile_size,
                        overlap=options.overlap, score_threshold=options.score_threshold, bands=run.bands,
                        device=options.device,
                        extent=(extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
                        if extent is not None else None)


class RunQueue(QObject):
    """Runs :class:`SegmentRun` s one after the other; the first failure ends the queue (the runs after it are
    dropped, their temporary files removed). A failed or cancelled run leaves nothing at its output.

    Signals: ``message(str, str)`` per log line (text, kind: :data:`INFO`, :data:`COMMAND`, :data:`ENGINE`,
    :data:`WARNING`); ``progressChanged(float)`` 0-100 over the queue; ``runFinished(SegmentRun)`` after each run
    that succeeded (its layer loaded when ``add_layers``); ``finished(EngineResult)`` once: the last run's result,
    or the first failure's.
    """

    message = pyqtSignal(str, str)
    progressChanged = pyqtSignal(float)
    runFinished = pyqtSignal(object)
    finished = pyqtSignal(object)

    def __init__(self, parent: QObject | None = None, add_layers: bool = True) -> None:
        super().__init__(parent)
        self.add_layers = add_layers
        self.queue: list[SegmentRun] = []
        self.done: list[SegmentRun] = []
        self.options: SegmentOptions | None = None
        self.job: EngineJob | None = None
        self.render_task: RenderTask | None = None
        self._cancelling = False

    def is_busy(self) -> bool:
        """True while runs are queued (an engine process or a render task runs)."""
        return bool(self.queue)

    # -- asynchronous (the dock) ---------------------------------------------------------------------------
    def start(self, runs: list[SegmentRun], options: SegmentOptions) -> None:
        """Start ``runs`` in the background; ``finished`` tells the end."""
        self.queue, self.done, self.options, self._cancelling = list(runs), [], options, False
        self._next()

    def cancel(self) -> None:
        """End the engine process (SIGTERM, then kill) or the render task; nothing is added."""
        if not self.queue:
            return
        self._cancelling = True
        self.message.emit("cancel requested", INFO)
        if self.job is not None and self.job.is_running():
            self.job.cancel()
        elif self.render_task is not None:
            self.render_task.cancel()

    def shutdown(self) -> None:
        """End everything at once (plugin unload): no signal is emitted, nothing is left behind."""
        runs, self.queue = self.queue, []
        if self.render_task is not None:
            self.render_task.cancel()
            self.render_task = None
        if self.job is not None:
            job, self.job = self.job, None
            job.shutdown()
            if runs:
                remove_partial_outputs(runs[0].output, job.pid or None)
        for run in runs:
            self._discard(run)

    def _next(self) -> None:
        run = self.queue[0]
        if run.source is None:
            self.message.emit(run.render.describe(), INFO)
            task = RenderTask(run.render)
            task.taskCompleted.connect(lambda: self._on_rendered(run, task))
            task.taskTerminated.connect(lambda: self._on_rendered(run, task))
            self.render_task = task
            QgsApplication.taskManager().addTask(task)
            return
        self.job = self._job(run)
        self.job.jobFinished.connect(self._on_job_finished)
        self.job.start()

    def _on_rendered(self, run: SegmentRun, task: RenderTask) -> None:
        self.render_task = None
        if self._cancelling:
            self._end(EngineResult(ok=False, cancelled=True, message="cancelled"))
        elif task.status() != QgsTask.Complete:
            self._end(EngineResult(ok=False, message=task.error or f"{run.layer_name}: rendering failed"))
        else:
            run.source = run.render.path
            self._next()

    def _on_job_finished(self, result: EngineResult) -> None:
        job, self.job = self.job, None
        result = self._after_engine(self.queue[0], result, job.pid if job is not None else 0)
        if job is not None:
            job.deleteLater()
        if result.ok and self.queue:
            self._next()
        else:
            self._end(result)

    # -- blocking (Processing) -----------------------------------------------------------------------------
    def run_blocking(self, runs: list[SegmentRun], options: SegmentOptions,
                     feedback: QgsFeedback | None = None) -> EngineResult:
        """Run ``runs`` in this thread, to their end; ``feedback``'s Cancel ends the render or the engine."""
        self.queue, self.done, self.options = list(runs), [], options
        result = EngineResult(ok=True)
        while self.queue:
            run = self.queue[0]
            if feedback is not None and feedback.isCanceled():
                result = EngineResult(ok=False, cancelled=True, message="cancelled")
                break
            if run.source is None:
                self.message.emit(run.render.describe(), INFO)
                try:
                    run.source = run.render.write(feedback)
                except LayerError as exc:
                    result = EngineResult(ok=False, message=str(exc))
                    break
                if feedback is not None and feedback.isCanceled():
                    continue
            job = self._job(run)
            if job.start():
                job.wait(feedback)
            result = self._after_engine(run, job.result, job.pid)
            job.deleteLater()
            if not result.ok:
                break
        self._end(result)
        return result

    # -- both ----------------------------------------------------------------------------------------------
    def _job(self, run: SegmentRun) -> EngineJob:
        args = segment_command(run, self.options)
        self.message.emit("rs-engine " + " ".join(args), COMMAND)
        job = EngineJob("rs-engine", args, parent=self)
        job.engineEvent.connect(self._on_event)
        job.logLine.connect(self._on_line)
        return job

    def _on_event(self, event: dict) -> None:
        if event.get("event") == "progress":
            value = segment_percent(event)
            total = len(self.queue) + len(self.done)
            if value is not None and total:
                self.progressChanged.emit((len(self.done) * 100 + value) / total)

    def _on_line(self, line: str) -> None:
        self.message.emit(*engine_line(line))

    def _after_engine(self, run: SegmentRun, result: EngineResult, pid: int) -> EngineResult:
        """Clean up after the engine; on success load the result (when asked) and move the run to ``done``."""
        run.result = result
        if not result.ok:
            remove_partial_outputs(run.output, pid or None)
            return result
        try:
            if self.add_layers:
                run.layer = add_result_layer(run.output, result_layer_name(run.layer_name, self.options.model_name))
            self.message.emit(f"{run.layer_name}: {result.done.get('features', '?')} instances -> {run.output}",
                              INFO)
        except LayerError as exc:
            return EngineResult(ok=False, message=str(exc))
        finally:
            if run.render is not None:
                remove_file(run.render.path)
        self.done.append(self.queue.pop(0))
        self.runFinished.emit(run)
        return result

    def _discard(self, run: SegmentRun) -> None:
        """Remove what a failed, cancelled or dropped run left: its temporary output, its rendered raster."""
        if run.temporary_output:
            remove_file(run.output)
        if run.render is not None:
            remove_file(run.render.path)

    def _end(self, result: EngineResult) -> None:
        remaining, self.queue = self.queue, []
        for run in remaining:
            self._discard(run)
        self.finished.emit(result)


def relay_to(feedback: QgsFeedback) -> Callable[[str, str], None]:
    """A :attr:`RunQueue.message` slot that writes to a Processing feedback (info, command, console, warning)."""
    def on_message(text: str, kind: str) -> None:
        {INFO: feedback.pushInfo, COMMAND: feedback.pushCommandInfo, ENGINE: feedback.pushConsoleInfo,
         WARNING: feedback.pushWarning}[kind](text)

    return on_message
