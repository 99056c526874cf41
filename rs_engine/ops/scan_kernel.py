"""Build, load and call the fused CPU selective-scan kernel (``scan_fused_cpu.c``) without PyTorch: the C
library, compiled on first use, and :func:`scan_forward_arrays` on numpy buffers (what OpenVINO's scan operation
calls, :mod:`rs_engine.runtime_openvino`). :mod:`rs_engine.ops.scan_fused` wraps the same library for PyTorch
(forward and backward, autograd).

How it is built: the C compiler found on the machine (``$CC``, ``cc``, ``gcc`` or ``clang``) builds it with
``-O3 -march=native -fopenmp`` into the user cache (``$XDG_CACHE_HOME/delineate`` or ``~/.cache/delineate``), keyed
by the source, the flags and the CPU's feature flags, written to a temporary name and renamed, so that concurrent
processes never load a partial file. ``DELINEATE_SCAN_MARCH`` replaces ``native`` (e.g. ``x86-64-v3``: what an
AVX2-only CPU runs). Where no compiler works, :func:`fused_cpu_status` says why (the callers then keep the chunked
PyTorch scan or the exported operator graph). ``DELINEATE_SCAN=chunked`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: ONNX domain and type of the node that stands for one selective scan in the graph exported for OpenVINO
#: (:func:`rs_engine.ops.scan_export.selective_scan_custom_op`), which runs it with :func:`scan_forward_arrays`.
CUSTOM_OP_DOMAIN, CUSTOM_OP_TYPE = "delineate", "SelectiveScan"
_SOURCE = Path(__file__).with_name("scan_fused_cpu.c")
#: Tokens per block: the unit of the elementwise SIMD passes and of the backward's state checkpoints.
BLOCK = 64
#: Largest dstate the kernel's on-stack state holds (Mamba uses 16).
MAX_DSTATE = 64
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]
#: Added where the target has no AVX-512: it lets GCC if-convert the branch-free exp/softplus/sigmoid loops, which
#: on AVX2 stayed scalar ("control flow in loop"; AVX-512's masked instructions vectorise them anyway). Measured with
#: bench/scan.py (dim 512, L 16384, with z, one thread; docs/benchmarks.md 2f): AVX2 build 450 -> 179 ms (dstate
#: 16), 574 -> 312 ms (dstate 8); the AVX-512 build got slower with it (about 150 against 120 ms), so it is not used
#: there. No value changes: nothing here reads floating-point exception flags.
_NO_AVX512_FLAGS = ["-fno-trapping-math"]
#: Environment variable giving the kernel's ``-march`` (default ``native``): e.g. ``x86-64-v3`` (AVX2 and FMA)
#: builds what an AVX2-only CPU runs, to measure one on a newer CPU (docs/benchmarks.md 2b).
MARCH_ENV = "DELINEATE_SCAN_MARCH"


def _march() -> str:
    return os.environ.get(MARCH_ENV) or "native"


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "delineate"


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared by machines never loads a foreign -march build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _target_has_avx512(cc: str) -> bool:
    """Whether the kernel's target (``-march``) has AVX-512F: the CPU's flags for ``native``, else the compiler's."""
    if _march() == "native":
        return "avx512f" in _cpu_flags().split()
    try:
        r = subprocess.run([cc, f"-march={_march()}", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return "__AVX512F__" in r.stdout


def _compile(cc: str, out: Path, openmp: bool, flags: list[str]) -> None:
    extra = ["-fopenmp"] if openmp else ["-fopenmp-simd"]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, *extra, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """Build (once per machine) and load the kernel; return it, or None, and a one-line status."""
    if os.environ.get("DELINEATE_SCAN", "").lower() == "chunked":
        return None, "fused CPU scan off (DELINEATE_SCAN=chunked)"
    ccs = [c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)]
    if not ccs:
        return None, "fused CPU scan unavailable: no C compiler (cc, gcc or clang) on PATH"
    cc = ccs[0]
    flags = [*_FLAGS, f"-march={_march()}", *([] if _target_has_avx512(cc) else _NO_AVX512_FLAGS)]
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    errors = []
    for openmp in (True, False):  # without OpenMP (e.g. Apple clang): one thread, still vectorised
        out = _cache_dir() / f"scan_fused_cpu-{key}-{'omp' if openmp else 'serial'}.so"
        try:
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                _compile(cc, out, openmp, flags)
            lib = ctypes.CDLL(str(out))
        except (OSError, subprocess.SubprocessError) as exc:
            msg = getattr(exc, "stderr", None) or str(exc)
            errors.append(f"{cc}{' -fopenmp' if openmp else ''}: {msg.strip().splitlines()[-1] if msg else exc}")
            continue
        _declare(lib)
        threads = "OpenMP" if openmp else "one thread"
        return lib, f"fused CPU scan: C kernel built by {cc} -march={_march()} ({threads}), {out.name}"
    return None, "fused CPU scan unavailable: " + "; ".join(errors)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.scan_fwd.argtypes = [i64] * 6 + [ptr] * 8 + [cint] + [ptr] * 3 + [cint]
    lib.scan_fwd.restype = None
    lib.scan_bwd.argtypes = [i64] * 6 + [ptr] * 8 + [cint] + [ptr] * 11 + [cint]
    lib.scan_bwd.restype = None


def fused_cpu_status() -> str:
    """One line for ``rs-engine doctor``: whether the fused CPU kernel is built and loaded, or why not."""
    return _library()[1]


def fused_cpu_available() -> bool:
    """True when the fused CPU kernel is loaded (it is built on the first call)."""
    return _library()[0] is not None


def scan_forward_arrays(u, delta, A, Bt, Ct, D, bias, softplus: bool, out, threads: int = 1) -> None:  # noqa: ANN001
    """The kernel's forward on float32 C-contiguous numpy arrays, written into ``out``: no autograd, no tensors
    (the OpenVINO operation, :class:`rs_engine.runtime_openvino.SelectiveScanOp`, calls it on its buffers).

    Args:
        u, delta, out: (batch, dim, L). A: (dim, dstate). Bt, Ct: token-major (batch, groups, L, dstate).
        D, bias: (dim,). softplus: on ``delta + bias``. threads: OpenMP threads for the channels.

    Raises:
        RuntimeError: the kernel could not be built (:func:`fused_cpu_status` says why).
    """
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(fused_cpu_status())
    batch, dim, L = u.shape
    G, N = Bt.shape[1], A.shape[1]
    last = np.empty((batch, dim, N), dtype=np.float32)  # the kernel always writes the last state
    lib.scan_fwd(batch, dim, L, N, G, BLOCK, u.ctypes.data, delta.ctypes.data, A.ctypes.data, Bt.ctypes.data,
                 Ct.ctypes.data, D.ctypes.data, None, bias.ctypes.data, int(softplus), out.ctypes.data,
                 last.ctypes.data, None, max(1, threads))
