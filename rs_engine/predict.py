"""Predicting tiles in this process: read, predict, vectorise, batch by batch, in one stream or several
concurrent ones (:func:`local_batches`), and the step a cluster's workers run (:func:`predict_tiles`)."""

from __future__ import annotations

import collections
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rs_engine.errors import Cancelled, InputError
from rs_engine.postprocess import Instance, tile_instances
from rs_engine.raster import RasterSource
from rs_engine.tiling import Tile, TilePlan

if TYPE_CHECKING:
    from rs_engine.pipeline import SegmentOptions

#: ``predictor(list of (C, H, W) float32 arrays) -> list of dicts`` of arrays (torchvision Mask R-CNN's eval-mode
#: convention; :mod:`rs_engine.runtime`).
Predictor = Callable[[list[np.ndarray]], list[dict[str, Any]]]


@dataclass
class TileBatch:
    """Consecutive tiles of one input's plan, predicted: what the merger takes, in plan order.

    Attributes:
        source: index of the input in the run.
        tiles: the tiles, consecutive in the plan (row-major).
        instances: per tile, its :class:`Instance` s (empty for tiles skipped as all-nodata).
        skipped: tiles not predicted because they hold no valid pixel.
    """

    source: int
    tiles: Sequence[Tile]
    instances: list[list[Instance]]
    skipped: int


def predict_tiles(
    source: RasterSource,
    tiles: Sequence[Tile],
    predictor: Predictor,
    score_threshold: float,
    options: SegmentOptions,
) -> tuple[list[list[Instance]], int]:
    """Read, predict and vectorise ``tiles`` of ``source`` in one forward pass (the step the cluster's workers
    run too); tiles without a valid pixel are not predicted.

    Returns:
        Per tile its instances in grid pixels, and how many tiles were skipped.

    Raises:
        InputError: pixels that can't be read (corrupt or truncated file).
        RuntimeError: the predictor returned a wrong number of results.
    """
    reads = [source.read_tile(tile) for tile in tiles]
    return predict_reads(reads, tiles, predictor, score_threshold, options)


def predict_reads(
    reads: Sequence[tuple[np.ndarray, np.ndarray]],
    tiles: Sequence[Tile],
    predictor: Predictor,
    score_threshold: float,
    options: SegmentOptions,
) -> tuple[list[list[Instance]], int]:
    """:func:`predict_tiles` after the reading: ``reads`` are the tiles' (image, valid mask) pairs."""
    todo = [i for i, (_, valid) in enumerate(reads) if valid.any()]  # skip all-nodata tiles
    outputs = _predict(predictor, [reads[i][0] for i in todo])
    by_tile = dict(zip(todo, outputs, strict=True))
    instances = [
        tile_instances(by_tile[i], tile, reads[i][1], score_threshold, options.mask_threshold, options.min_pixels)
        if i in by_tile
        else []
        for i, tile in enumerate(tiles)
    ]
    return instances, len(tiles) - len(todo)


#: Most concurrent streams chosen automatically: each holds a batch's activations (a few hundred MB).
MAX_AUTO_STREAMS = 4


def stream_plan(threads: int | None, streams: int | None, device: str = "cpu") -> tuple[int, int]:
    """How a run uses the CPU: ``(streams, runtime threads per stream)``.

    Concurrent batches, each on fewer runtime threads, use cores better than one batch on all of them (many of a
    detection network's operators run on one thread, or scale poorly): on 2 cores, 2 streams of 1 thread segment
    1.25x (PyTorch) and 1.41x (ONNX Runtime) the Mpx/s of 1 stream of 2 threads, end to end (docs/benchmarks.md
    2d). ``threads``: the total (None: ``OMP_NUM_THREADS``, else all cores); ``streams``
    None: one per thread up to :data:`MAX_AUTO_STREAMS`, 1 on a CUDA device.

    Raises:
        InputError: ``threads`` or ``streams`` below 1.
    """
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be at least 1")
    if streams is not None and streams < 1:
        raise InputError(f"--streams {streams}: must be at least 1")
    env = os.environ.get("OMP_NUM_THREADS", "")
    total = threads or (int(env) if env.isdigit() and int(env) > 0 else os.cpu_count() or 1)
    if streams is None:
        streams = 1 if device.startswith("cuda") else max(1, min(total, MAX_AUTO_STREAMS))
    return streams, max(1, total // streams)


def local_batches(
    sources: Sequence[RasterSource],
    plans: Sequence[TilePlan],
    predictor: Predictor,
    score_threshold: float,
    options: SegmentOptions,
    cancel: threading.Event | None,
    streams: int = 1,
) -> Iterator[TileBatch]:
    """Predict in this process, ``options.batch_size`` tiles at a time, checking ``cancel`` before each; with
    ``streams`` > 1 that many batches at once in a thread pool, read in this thread (a raster handle is not
    thread-safe) while the others predict, and yielded in plan order. At most ``streams`` batches are in flight."""
    jobs = ((k, source, batch) for k, (source, plan) in enumerate(zip(sources, plans, strict=True))
            for batch in _batched(plan.tiles, options.batch_size))
    if streams <= 1:
        for k, source, batch in jobs:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            instances, skipped = predict_tiles(source, batch, predictor, score_threshold, options)
            release_free_memory()
            yield TileBatch(k, batch, instances, skipped)
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(streams, thread_name_prefix="rs-engine-stream") as pool:
        try:
            for k, source, batch in jobs:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                reads = [source.read_tile(tile) for tile in batch]
                pending.append((k, batch, pool.submit(predict_reads, reads, batch, predictor, score_threshold,
                                                      options)))
                if len(pending) >= streams:
                    k0, batch0, done = pending.popleft()
                    release_free_memory()
                    yield TileBatch(k0, batch0, *done.result())
            while pending:
                k0, batch0, done = pending.popleft()
                yield TileBatch(k0, batch0, *done.result())
        finally:
            for *_, future in pending:
                future.cancel()


def _libc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


#: glibc heaps ("arenas") the process may use; glibc's default is 8 per core.
MALLOC_ARENAS = 2


@functools.cache
def limit_malloc_arenas() -> None:
    """Cap glibc's heaps at :data:`MALLOC_ARENAS` (``mallopt(M_ARENA_MAX)``, as ``MALLOC_ARENA_MAX=2`` would at
    start-up), once per process, before the streams' and the runtime's threads allocate.

    Why: each thread that allocates gets its own heap, and each heap keeps freed pages scattered among live blocks
    that :func:`release_free_memory` cannot return; peak RSS then grew with the length of the run (2-core Xeon,
    OpenVINO, 2 threads, batch 1, one run each: 704 MB at 2048 px, 784 MB at 8192 px; with ``MALLOC_ARENA_MAX=2``
    699 and 736 MB). Heaps already made are kept, so :func:`rs_engine.pipeline.segment` calls it before loading
    the model; a no-op where the C library is not glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_MALLOC_TRIM = _libc_trim()


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``), once per batch.

    Why: a batch frees hundreds of MB of activations, and glibc's heap, its mmap threshold raised by those frees,
    keeps them scattered among live blocks, so peak RSS crept up with the number of tiles (1081 MB at 2048 px,
    1237 MB at 16384 px; docs/benchmarks.md 3). A no-op where the C library is not glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _predict(predictor: Predictor, images: list[np.ndarray]) -> list[dict[str, Any]]:
    if not images:
        return []
    outputs = predictor(images)
    if len(outputs) != len(images):
        raise RuntimeError(f"predictor returned {len(outputs)} results for {len(images)} tiles")
    return outputs


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
