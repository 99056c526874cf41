"""What the benchmarks share: machine ceilings, measuring a child process's peak RSS, tables, plots, test rasters.

Every figure of a benchmark is measured in one run beside its baseline and its ceilings, because the machine is
shared and noisy: ratios within a run are what count. Peak RSS is the kernel's own high-water mark of a child
process (``ru_maxrss`` from ``os.wait4``, taken in a small launcher so that the benchmark's own memory is not
counted), so each measured run is a fresh process.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NWPU_IMAGES = SHARED / "nwpu_vhr10" / "images"


def machine() -> dict[str, Any]:
    """Who measured: CPU model, cores, load average, torch version and threads."""
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The CPU's fp32 matrix-product rate in GFLOP/s (best of ``repeats`` n x n x n products, 2 n^3 FLOPs each):
    the ceiling a convolution- or projection-bound model can reach with the current thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def read_mbps(path: Path, window: int = 512) -> dict[str, float]:
    """Raster read rate of ``path`` in MB/s of decoded pixels, window by window as the engine reads: the first
    pass (file possibly cold in the page cache) and a second, warm one."""
    import rasterio
    from rasterio.windows import Window

    rates = []
    for _ in range(2):
        t = time.perf_counter()
        nbytes = 0
        with rasterio.open(path) as ds:
            for row in range(0, ds.height, window):
                for col in range(0, ds.width, window):
                    a = ds.read(window=Window(col, row, min(window, ds.width - col), min(window, ds.height - row)))
                    nbytes += a.nbytes
        rates.append(nbytes / (time.perf_counter() - t) / 1e6)
    return {"first_pass_mbps": round(rates[0], 1), "warm_mbps": round(rates[1], 1)}


#: The launcher of a measured command: a bare interpreter (about 10 MB) forks and execs it, so that the command's
#: ``ru_maxrss`` starts from the launcher's resident set and not from the benchmark's. Linux carries a process's
#: high-water mark across exec from the memory it was forked with, so a command forked straight from a benchmark
#: holding torch and test rasters (500 MB and more) reported at least that as its own peak (measured: ``sleep``
#: forked from a process holding 800 MB reported 834 MB). It writes the command's peak (KiB) to the given fd.
_LAUNCHER = """
import os, resource, sys
fd, cap = int(sys.argv[1]), int(sys.argv[2])
pid = os.fork()
if pid == 0:
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    os.close(fd)
    try:
        os.execvp(sys.argv[3], sys.argv[3:])
    except OSError as exc:
        sys.stderr.write(f"{sys.argv[3]}: {exc}\\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(fd, str(usage.ru_maxrss).encode())
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None,
                 mem_cap_gb: float | None = None) -> dict[str, Any]:
    """Run ``cmd``; return ``{"rc", "seconds", "peak_rss_mb", "stdout", "stderr", "timed_out"}``.

    ``peak_rss_mb`` is the command's own maximum resident set size (``ru_maxrss`` of ``os.wait4`` on its pid, in a
    small launcher process: see :data:`_LAUNCHER`), not the machine's. ``mem_cap_gb`` caps the command's address
    space (``RLIMIT_AS``), so a model that would need more fails with an allocation error in the child instead of
    pushing the shared machine into swap or the OOM killer. A command killed by a signal has ``rc`` 128 + signal.
    """
    import signal
    import sys
    import tempfile
    import threading

    cap = int(mem_cap_gb * 2**30) if mem_cap_gb else 0
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t = time.perf_counter()
        try:
            p = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(write_fd), str(cap), *cmd],
                                 stdout=fo, stderr=fe, text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
                                 start_new_session=True, pass_fds=(write_fd,))  # fmt: skip
        finally:
            os.close(write_fd)
        timer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))  # launcher and command
        timer.start()
        p.wait()
        seconds = time.perf_counter() - t
        timed_out = not timer.is_alive()
        timer.cancel()
        with os.fdopen(read_fd, "rb") as f:
            kib = f.read().decode()
        fo.seek(0)
        fe.seek(0)
        return {"rc": p.returncode, "seconds": seconds, "peak_rss_mb": round(int(kib) / 1024, 1) if kib else 0.0,
                "stdout": fo.read(), "stderr": fe.read(), "timed_out": timed_out}


def peak_rss_mb() -> float:
    """This process's peak RSS so far in MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_json(out: str) -> dict[str, Any] | None:
    """The last line of ``out`` that is a JSON object."""
    for line in reversed(out.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            return rec
    return None


def nwpu_mosaic(path: Path, side: int, cell: int = 512, seed: int = 0) -> Path:
    """A ``side`` x ``side`` 3-band uint8 GeoTIFF (tiled 512, deflate, UTM 33N, 0.5 m) tiled with ``cell`` px
    crops of NWPU VHR-10 images (real content: airplanes, ships, tanks, vehicles...), written window by window so
    a 16384 px mosaic never sits in memory. Reused when it already exists with that size.

    Raises:
        FileNotFoundError: the NWPU VHR-10 images are not in ../shared/data.
    """
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        with rasterio.open(path) as ds:
            if ds.width == side and ds.height == side:
                return path
    files = sorted(NWPU_IMAGES.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{NWPU_IMAGES}: NWPU VHR-10 images not found")
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.tif")
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500000, 4500000, 0.5, 0.5), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", BIGTIFF="IF_SAFER")
    crops: list[np.ndarray] = []
    for f in files[:64]:  # a pool of 64 crops, repeated: the mosaic stays varied without reading 650 JPEGs per row
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = np.asarray(Image.open(f).convert("RGB"))
        h, w = img.shape[:2]
        r, c = rng.integers(0, max(1, h - cell + 1)), rng.integers(0, max(1, w - cell + 1))
        crop = np.zeros((cell, cell, 3), np.uint8)
        part = img[r:r + cell, c:c + cell]
        crop[:part.shape[0], :part.shape[1]] = part
        crops.append(crop.transpose(2, 0, 1))
    with rasterio.open(tmp, "w", **profile) as ds:
        for row in range(0, side, cell):
            for col in range(0, side, cell):
                a = crops[int(rng.integers(len(crops)))]
                h, w = min(cell, side - row), min(cell, side - col)
                ds.write(a[:, :h, :w], window=Window(col, row, w, h))
    os.replace(tmp, path)
    return path


def write_outputs(out: Path, name: str, record: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    print(table, flush=True)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import matplotlib.pyplot as plt
    return plt
