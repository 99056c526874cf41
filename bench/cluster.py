"""Scale-out: ``rs-engine segment`` on a Dask ``local:N`` cluster against one process with N threads.

Usage::

    .venv/bin/python bench/cluster.py [--quick] [--out bench/results] [--data out/bench] [--workers 2]
        [--scenes 8] [--scene-side 1024] [--model nwpu10] [--block-tiles 4]

The input is a folder of ``--scenes`` GeoTIFF scenes of real NWPU VHR-10 content (:func:`bench.common.nwpu_mosaic`,
one seed each), segmented whole by the default model in two fresh processes, one after the other:

1. one process, ``OMP_NUM_THREADS=N`` (the engine's usual run on N cores);
2. ``--scheduler local:N``: N worker processes of one thread each, blocks of ``--block-tiles`` tiles.

Each run is timed whole (start-up, cluster start, model loading, reading, inference, merging, writing): Mpx/s and
the speed-up of 2 over 1. Peak memory: the command's process and each worker process (RSS sampled every 0.2 s
with psutil; the highest sample); the command's CPU seconds (with a cluster: start-up, scheduling, merging and
writing, the client's share of the work). Both runs must give the same number of objects.

Writes ``cluster.json`` and ``cluster.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, last_json, machine, nwpu_mosaic, run_measured, write_outputs  # noqa: E402


class ChildSampler:
    """Highest RSS (MB) of the ``rs-engine`` command and of each Dask worker process it spawns, sampled every
    ``period`` s (``ru_maxrss`` of the command would include its workers: Linux folds waited-for children in)."""

    def __init__(self, period: float = 0.2) -> None:
        import psutil

        self._me, self._period = psutil.Process(), period
        self.command = 0.0
        self.command_cpu_s = 0.0  # user + system CPU seconds of the command, at its last sample
        self.workers: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for child in self._me.children(recursive=True):
                try:
                    rss = child.memory_info().rss / 2**20
                    cmd = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if "rs_engine.cli" in cmd:
                    self.command = max(self.command, rss)
                    with contextlib.suppress(psutil.Error):
                        times = child.cpu_times()
                        self.command_cpu_s = times.user + times.system
                elif "spawn_main" in cmd:  # a multiprocessing child: a Dask nanny or worker
                    self.workers[child.pid] = max(self.workers.get(child.pid, 0.0), rss)
            self._stop.wait(self._period)

    def __enter__(self) -> ChildSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(folder: Path, out: Path, model: str, workers: int, scheduler: bool, block_tiles: int, mpx: float,
        timeout: float) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "rs_engine.cli", "segment", str(folder), "-o", str(out), "--model", model,
           "--progress", "jsonl", "--overwrite"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1" if scheduler else str(workers)}
    if scheduler:
        cmd += ["--scheduler", f"local:{workers}", "--block-tiles", str(block_tiles)]
    load = round(os.getloadavg()[0], 2)
    with ChildSampler() as sampler:
        r = run_measured(cmd, timeout, env=env)
    done = last_json(r["stdout"]) or {}
    rec = {"run": f"local:{workers}" if scheduler else f"one process, {workers} threads", "loadavg_1min": load,
           "seconds": round(r["seconds"], 1), "rc": r["rc"], "peak_rss_mb": round(sampler.command),
           "command_cpu_s": round(sampler.command_cpu_s, 1),
           # nannies stay small (~100 MB): the workers are the processes that load the model
           "worker_peak_rss_mb": sorted(round(v) for v in sampler.workers.values() if v > 200)}  # fmt: skip
    if r["rc"] == 0:
        rec["mpx_per_s"] = round(mpx / r["seconds"], 4)
        rec["objects"] = done.get("features")
    else:
        rec["error"] = (r["stderr"].strip().splitlines() or ["?"])[-1][:200]
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 scenes of 512 px: a smoke test")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--data", type=Path, default=ROOT / "out" / "bench", help="where the scenes are cached")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--scene-side", type=int, default=1024)
    ap.add_argument("--model", default="nwpu10")
    ap.add_argument("--block-tiles", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    scenes, side = (2, 512) if args.quick else (args.scenes, args.scene_side)
    folder = args.data / f"scenes_{scenes}x{side}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(scenes):
        nwpu_mosaic(folder / f"scene_{k:02d}.tif", side, seed=100 + k)
    mpx = scenes * side * side / 1e6
    info = machine()
    print(json.dumps(info), flush=True)
    record = {"machine": info, "scenes": scenes, "side": side, "mpx": round(mpx, 2), "model": args.model,
              "block_tiles": args.block_tiles, "runs": []}  # fmt: skip
    for scheduler in (False, True):
        out = args.data / f"cluster_{'dask' if scheduler else 'one'}.gpkg"
        record["runs"].append(run(folder, out, args.model, args.workers, scheduler, args.block_tiles, mpx,
                                  args.timeout))  # fmt: skip
    one, dask = record["runs"]
    if one.get("mpx_per_s") and dask.get("mpx_per_s"):
        record["speedup"] = round(dask["mpx_per_s"] / one["mpx_per_s"], 2)
        record["same_objects"] = one.get("objects") == dask.get("objects")
    write_outputs(args.out, "cluster", record, _table(record))


def _table(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        f"{rec['scenes']} scenes of {rec['side']} px ({rec['mpx']} Mpx of real NWPU VHR-10 content), model "
        f"`{rec['model']}`, blocks of {rec['block_tiles']} tiles; {m['cpu']}, {m['cores']} cores, load average "
        f"{m['loadavg_1min']} at the start.",
        "",
        "| run | seconds | Mpx/s | objects | command CPU s | peak RSS, command (MB) | peak RSS per worker (MB) "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["runs"]:
        workers = ", ".join(str(v) for v in r["worker_peak_rss_mb"]) or "-"
        lines.append(f"| {r['run']} | {r['seconds']} | {r.get('mpx_per_s', r.get('error'))} | {r.get('objects')} | "
                     f"{r['command_cpu_s']} | {r['peak_rss_mb']} | {workers} | {r['loadavg_1min']} |")  # fmt: skip
    if "speedup" in rec:
        lines += ["", f"Speed-up of the cluster over one process: {rec['speedup']}x; same objects: "
                      f"{rec['same_objects']}."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
