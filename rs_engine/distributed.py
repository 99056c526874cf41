"""Scale-out: predict the tiles of a run on a Dask cluster (``--scheduler local:N`` or ``tcp://HOST:PORT``).

How the work is cut and put back together:

1. Blocks. Each input's tile plan is cut into blocks of ``block_tiles`` consecutive tiles (row-major); a block
   never spans two inputs, so a scene with fewer tiles is one block. The tiles keep the plan's overlap, so a
   block edge is a tile edge like any other.
2. Workers. A block is one Dask task: the worker reopens the raster on the grid the client planned (same
   bands, resampling and extent), reads, predicts and vectorises its tiles with
   :func:`rs_engine.pipeline.predict_tiles`, and returns the tiles' instances (polygons in grid pixels, a few kB
   per tile). The model is loaded once per worker process and kept.
3. Merge. The client feeds the blocks' instances to the same :class:`~rs_engine.postprocess.TileMerger` in plan
   order, and writes with the same writer as a run in one process: objects cut by block edges are merged by the
   exact-once rules of tile edges, and the features equal those of a single-process run.
4. Memory. At most ``2 x worker threads + 2`` blocks are submitted ahead of the merge; finished blocks wait on
   their workers until the merge takes them, so the client holds one block at a time.
5. Faults. Results come back through Dask only, so a worker killed mid-block has its block rerun on another
   worker by the scheduler (Dask's ``allowed-failures`` times) and each block is merged exactly once. A cancel
   (the ``cancel`` event, Ctrl-C, SIGTERM) cancels every submitted block, and a local cluster is shut down.

Inputs and a model given by path must be readable at the same path on every worker (a shared file system, or a
GDAL virtual path such as ``/vsis3/...``); a bundled model name is resolved on each worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import rasterio

from rs_engine.errors import InputError
from rs_engine.pipeline import (
    Cancelled,
    Predictor,
    SegmentOptions,
    TileBatch,
    gdal_options,
    predict_tiles,
)
from rs_engine.postprocess import Instance
from rs_engine.raster import RasterSource
from rs_engine.runtime import load_predictor
from rs_engine.tiling import Grid, Tile, TilePlan

log = logging.getLogger(__name__)

#: Seconds to wait for a remote scheduler before giving up with a one-line error.
CONNECT_TIMEOUT = 20
#: Seconds between looks at the cancel event while waiting for a block.
POLL_SECONDS = 0.2

_SCHEDULER = re.compile(r"^(?:local:(?P<n>\d+)|(?P<address>(?:tcp|tls|ucx)://[^\s/]+:\d+))$")


@dataclass(frozen=True)
class Scheduler:
    """A parsed ``--scheduler``: ``workers`` local processes, or the ``address`` of a running scheduler."""

    spec: str
    workers: int = 0
    address: str | None = None


def parse_scheduler(text: str) -> Scheduler:
    """``local:N`` (N worker processes on this machine) or ``tcp://HOST:PORT`` (a running Dask scheduler).

    Raises:
        InputError: another form, N < 1, or Dask distributed is not installed.
    """
    match = _SCHEDULER.match(text.strip())
    if match is None:
        raise InputError(f"--scheduler {text}: use local:N (N worker processes) or tcp://HOST:PORT")
    if importlib.util.find_spec("distributed") is None:
        raise InputError(f"--scheduler {text}: needs Dask distributed (pip install 'delineate[cluster]')")
    if match["n"] is not None:
        workers = int(match["n"])
        if workers < 1:
            raise InputError(f"--scheduler {text}: needs at least 1 worker")
        return Scheduler(text, workers=workers)
    return Scheduler(text, address=match["address"])


@contextlib.contextmanager
def connect(scheduler: Scheduler, on_cluster: Callable[[str | None, int], None] | None = None) -> Iterator:
    """A ``distributed.Client`` for ``scheduler``; a local cluster is started here and shut down on exit.

    Local workers are processes of one thread each (one block at a time), and torch in each uses
    ``cpu_count // N`` threads, so ``local:N`` fills the machine without oversubscribing it.

    Raises:
        InputError: the remote scheduler can't be reached within :data:`CONNECT_TIMEOUT` seconds.
    """
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler.address is None:
        threads = max(1, (os.cpu_count() or 1) // scheduler.workers)
        dashboard = ":0" if importlib.util.find_spec("bokeh") else None  # served only with bokeh installed
        cluster = LocalCluster(
            n_workers=scheduler.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard,
            silence_logs=logging.ERROR,
            env={"OMP_NUM_THREADS": str(threads)},
        )
        try:
            client = Client(cluster)
        except BaseException:  # Ctrl-C while connecting: no worker process may outlive the run
            cluster.close()
            raise
    else:
        try:
            client = Client(scheduler.address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InputError(f"--scheduler {scheduler.spec}: cannot connect ({reason})") from None
    try:
        info = client.scheduler_info()
        threads_total = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values())
        link = client.dashboard_link if "dashboard" in info.get("services", {}) else None
        log.info("Dask scheduler %s: %d worker thread(s)%s", info.get("address"), threads_total,
                 f", dashboard {link}" if link else "")  # fmt: skip
        if on_cluster is not None:
            on_cluster(link, threads_total)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@dataclass(frozen=True)
class SourceSpec:
    """What a worker needs to reopen an input exactly as the client planned it (picklable, no open file)."""

    path: str
    n_bands: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gsd: float | None
    label: str
    bands: tuple[int, ...]
    resample: bool
    grid: Grid

    @classmethod
    def of(cls, source: RasterSource, resample: bool) -> SourceSpec:
        # Absolute, so that a worker started in another folder (or another machine's mount) finds the file.
        return cls(str(source.path.absolute()), source.n_bands, tuple(source.mean), tuple(source.std), source.gsd,
                   source.label, tuple(source.bands), resample, source.grid)

    def open(self) -> RasterSource:
        """The source on the client's grid: same extent and resampling, so the same tiles."""
        source = RasterSource(self.path, self.n_bands, self.mean, self.std, self.gsd, list(self.bands),
                              self.resample, label=self.label)
        source.grid = self.grid
        return source


def blocks_of(plans: Sequence[TilePlan], block_tiles: int) -> list[tuple[int, tuple[Tile, ...]]]:
    """``(input index, tiles)`` per block: ``block_tiles`` consecutive tiles of one plan, in plan order.

    Raises:
        InputError: ``block_tiles`` < 1.
    """
    if block_tiles < 1:
        raise InputError(f"--block-tiles {block_tiles}: must be at least 1")
    return [
        (k, plan.tiles[i : i + block_tiles])
        for k, plan in enumerate(plans)
        for i in range(0, len(plan.tiles), block_tiles)
    ]


def block_batches(
    client,
    sources: Sequence[RasterSource],
    plans: Sequence[TilePlan],
    predictor: Predictor | None,
    score_threshold: float,
    options: SegmentOptions,
    run_id: str,
    cancel: threading.Event | None = None,
) -> Iterator[TileBatch]:
    """Submit the run's blocks to ``client`` and yield their predictions in plan order (module docstring).

    Args:
        predictor: None -> each worker loads ``options.model`` once; else this callable is sent with every
            block (it must be picklable: for tests and small stand-ins).

    Raises:
        Cancelled: ``cancel`` was set; every submitted block is cancelled.
        InputError, and any error of a block's task, as raised on the worker.
    """
    from distributed import wait

    blocks = blocks_of(plans, options.block_tiles)
    if Path(options.model).is_file():  # a model file, not a bundled name: the same file for every worker
        options = dataclasses.replace(options, model=str(Path(options.model).absolute()))
    specs = [SourceSpec.of(source, options.resample) for source in sources]
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values())
    ahead = 2 * max(1, threads) + 2
    futures: dict[int, object] = {}
    submitted = 0
    try:
        for i, (k, tiles) in enumerate(blocks):
            while submitted < len(blocks) and submitted < i + ahead:
                kk, block = blocks[submitted]
                futures[submitted] = client.submit(
                    predict_block, specs[kk], block, predictor, score_threshold, options,
                    key=f"delineate-{run_id}-block-{submitted}", priority=-submitted, pure=False,
                )  # fmt: skip
                submitted += 1
            future = futures.pop(i)
            while not future.done():
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                with contextlib.suppress(TimeoutError):
                    wait([future], timeout=POLL_SECONDS)
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            instances, skipped = future.result()
            future.release()
            yield TileBatch(k, tiles, instances, skipped)
    finally:
        if futures:
            client.cancel(list(futures.values()), force=True)


# ------------------------------------------------------------------------------------------------ workers

_MODELS: dict[tuple[str, str, str, float], Predictor] = {}
_MODELS_LOCK = threading.Lock()


def _worker_model(options: SegmentOptions, score_threshold: float) -> Predictor:
    """The model of this worker process, loaded on first use and kept for every later block and run.

    A local cluster's worker gets its share of the cores in ``OMP_NUM_THREADS`` (see :func:`connect`).
    """
    threads = os.environ.get("OMP_NUM_THREADS")
    key = (options.model, options.runtime, options.device, score_threshold)
    with _MODELS_LOCK:
        if key not in _MODELS:
            predictor, _ = load_predictor(options.model, options.runtime, options.device,
                                          int(threads) if threads and threads.isdigit() else options.threads)
            # As in a local run: drop low scores inside the box head, before full-tile masks are pasted.
            predictor.set_score_threshold(score_threshold)
            _MODELS[key] = predictor
        return _MODELS[key]


def predict_block(
    spec: SourceSpec,
    tiles: Sequence[Tile],
    predictor: Predictor | None,
    score_threshold: float,
    options: SegmentOptions,
) -> tuple[list[list[Instance]], int]:
    """The task of one block (runs on a worker): its tiles' instances, ``options.batch_size`` tiles per forward
    pass, and how many tiles were skipped as all-nodata."""
    if predictor is None:
        predictor = _worker_model(options, score_threshold)
    instances: list[list[Instance]] = []
    skipped = 0
    with rasterio.Env(**gdal_options()):
        source = spec.open()
        try:
            for i in range(0, len(tiles), options.batch_size):
                found, n = predict_tiles(source, tiles[i : i + options.batch_size], predictor, score_threshold,
                                         options)  # fmt: skip
                instances += found
                skipped += n
        finally:
            source.close()
    return instances, skipped
