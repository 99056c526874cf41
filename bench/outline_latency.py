"""Latency of prompted outlining through ``rs-engine serve`` (issue 16), as the QGIS map tool pays it.

Usage::

    .venv/bin/python bench/outline_latency.py [--model nwpu10] [--threads 2] [--repeats 5] [--out bench/results]

One ``rs-engine serve`` process on a real NWPU VHR-10 mosaic (4096 px, ``common.nwpu_mosaic``); each round clicks
a new place of the mosaic and times, from the client's side (request written to answer read):

* ``first point``: a point prompt in a window not yet embedded (default window: the model's tile, 512 px);
* ``further point``: a second point in the same window (the embedding cached: the heads only);
* ``first box 1024``: a box prompt of 900 px, whose window is 1024 px, not yet embedded;
* ``further box``: a box prompt inside that 1024 px window.

Also the start-up until ``ready`` (Python, PyTorch and the model). Writes ``outline_latency.json`` and ``.md``
(median and max seconds) with the load average of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, machine, nwpu_mosaic, write_outputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nwpu10")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--side", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="2 repeats, 2048 px")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.side = 2, 2048
    raster = nwpu_mosaic(ROOT / "out" / "bench" / f"nwpu_mosaic_{args.side}.tif", args.side)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rs_engine.cli", "serve", "--model", args.model, "--threads",
                             str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)  # fmt: skip
    ready = json.loads(proc.stdout.readline())
    startup = time.perf_counter() - t0
    assert ready["event"] == "ready", ready

    def ask(**request: object) -> tuple[float, dict]:
        t = time.perf_counter()
        proc.stdin.write(json.dumps({"op": "prompt", "raster": str(raster), **request}) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        if reply["event"] != "outline":
            raise RuntimeError(reply)
        return time.perf_counter() - t, reply

    times: dict[str, list[float]] = {"first point": [], "further point": [], "first box 1024": [], "further box": []}
    found = 0
    import rasterio

    with rasterio.open(raster) as ds:
        to_map = ds.transform  # prompts in the mosaic's map coordinates, as the map tool sends them
    for r in range(args.repeats):
        # A new place each round, 700 px from the last, points along the bottom and boxes along the top of the
        # mosaic: no prompt of a round falls in a window cached by an earlier one.
        x = 300 + 700 * r
        for key, request in (
            ("first point", {"point": to_map * (x + 0.5, args.side - 499.5)}),
            ("further point", {"point": to_map * (x + 60.5, args.side - 459.5)}),
            ("first box 1024", {"box": _box(to_map, x - 200, 50, 900)}),
            ("further box", {"box": _box(to_map, x + 100, 350, 200)}),
        ):
            seconds, reply = ask(**request)
            times[key].append(seconds)
            found += reply["wkt"] is not None
    proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
    proc.stdin.flush()
    proc.wait(timeout=60)
    record = {"machine": machine(), "model": ready["model"], "threads": args.threads, "raster_side": args.side,
              "startup_s": round(startup, 3), "found": found, "prompts": 4 * args.repeats,
              "seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()}}  # fmt: skip
    rows = [f"| {k} | {statistics.median(v):.3f} | {max(v):.3f} |" for k, v in times.items()]
    table = (f"rs-engine serve, {ready['model']}, {args.threads} thread(s), {args.repeats} rounds on a {args.side} px "
             f"NWPU mosaic; start-up to ready {startup:.2f} s; load average {record['machine']['loadavg_1min']}; "
             f"{found} of {4 * args.repeats} prompts found an object\n\n| prompt | median s | max s |\n|---|---|---|\n"
             + "\n".join(rows))
    write_outputs(args.out, "outline_latency", record, table)


def _box(to_map: object, col: float, row: float, side: float) -> list[float]:
    """[minx, miny, maxx, maxy] in map units of a ``side`` px square with top-left pixel (col, row)."""
    x0, y0 = to_map * (col, row)  # type: ignore[operator]
    x1, y1 = to_map * (col + side, row + side)  # type: ignore[operator]
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


if __name__ == "__main__":
    main()
