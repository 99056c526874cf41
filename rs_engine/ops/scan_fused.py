"""The fused CPU selective scan (:func:`selective_scan_fused`): one pass per (batch, channel) over the sequence,
the state in registers, forward and backward, in C (``scan_fused_cpu.c``), compiled on first use.

Why C and how it is built: the recurrence is sequential in ``L``, so a CPU scan is fast only when each step is a
few vector instructions on a state held in registers (mamba-ssm's CUDA kernel and llama.cpp's ``ssm_scan`` work
this way). numba was measured first and rejected: without SVML its ``exp`` is a scalar call per state, slower than
the chunked PyTorch scan. The kernel is plain C with its own vectorisable ``exp`` (Cephes, ~1 ulp); the C compiler
found on the machine (``$CC``, ``cc``, ``gcc`` or ``clang``) builds it with ``-O3 -march=native -fopenmp`` into the
user cache (``$XDG_CACHE_HOME/delineate`` or ``~/.cache/delineate``), keyed by the source, the flags and the CPU's
feature flags, written to a temporary name and renamed, so that concurrent processes never load a partial file.
Where no compiler works, :func:`fused_cpu_status` says why and the dispatcher keeps the chunked PyTorch scan.

Backward (as mamba-ssm's): the forward keeps the state at the start of every block of 64 tokens
(``(batch, dim, L / 64, dstate)`` floats); the backward recomputes each block's states from it in reverse block
order and runs the adjoint recurrence ``lambda_{t-1} = a_t * (lambda_t + C_t * dy_t)``. Threads split the
channels; ``dB`` and ``dC`` are summed over channels, so each thread accumulates its own copy.

Set ``DELINEATE_SCAN=chunked`` to force the PyTorch scan (benchmarks, or to rule the kernel out).
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
import torch

from rs_engine.ops.scan_contract import as_groups, check_args

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("scan_fused_cpu.c")
#: Tokens per block: the unit of the elementwise SIMD passes and of the backward's state checkpoints.
BLOCK = 64
#: Largest dstate the kernel's on-stack state holds (Mamba uses 16).
MAX_DSTATE = 64
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]


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


def _compile(cc: str, out: Path, openmp: bool) -> None:
    extra = ["-fopenmp"] if openmp else ["-fopenmp-simd"]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, *extra, str(_SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
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
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    cc, errors = ccs[0], []
    for openmp in (True, False):  # without OpenMP (e.g. Apple clang): one thread, still vectorised
        out = _cache_dir() / f"scan_fused_cpu-{key}-{'omp' if openmp else 'serial'}.so"
        try:
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                _compile(cc, out, openmp)
            lib = ctypes.CDLL(str(out))
        except (OSError, subprocess.SubprocessError) as exc:
            msg = getattr(exc, "stderr", None) or str(exc)
            errors.append(f"{cc}{' -fopenmp' if openmp else ''}: {msg.strip().splitlines()[-1] if msg else exc}")
            continue
        _declare(lib)
        threads = "OpenMP" if openmp else "one thread"
        return lib, f"fused CPU scan: C kernel built by {cc} -march=native ({threads}), {out.name}"
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


def fused_cpu_supports(u: torch.Tensor, A: torch.Tensor | None = None) -> bool:
    """Inputs the kernel takes: CPU, float32/float16/bfloat16 (computed in float32), dstate <= 64."""
    return (
        u.device.type == "cpu"
        and u.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and (A is None or (A.dtype != torch.float64 and A.shape[1] <= MAX_DSTATE))
    )


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedScanFn(torch.autograd.Function):
    """Autograd wrapper of the C kernel; B and C arrive token-major, (batch, G, L, N), float32, contiguous."""

    @staticmethod
    def forward(ctx, u, delta, A, Bt, Ct, D, z, bias, softplus: bool):
        lib = _library()[0]
        batch, dim, L = u.shape
        G, N = Bt.shape[1], A.shape[1]
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, N)
        ckpt = u.new_empty(batch, dim, -(-L // BLOCK), N) if save else None
        lib.scan_fwd(batch, dim, L, N, G, BLOCK, _p(u), _p(delta), _p(A), _p(Bt), _p(Ct), _p(D), _p(z), _p(bias),
                     int(softplus), _p(out), _p(last), _p(ckpt), torch.get_num_threads())
        if save:
            ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, bias, ckpt)
        ctx.softplus = softplus
        return out, last

    @staticmethod
    def backward(ctx, g_out, g_last):
        lib = _library()[0]
        u, delta, A, Bt, Ct, D, z, bias, ckpt = ctx.saved_tensors
        batch, dim, L = u.shape
        G, N = Bt.shape[1], A.shape[1]
        threads = max(1, min(torch.get_num_threads(), dim))
        g_out = torch.zeros_like(u) if g_out is None else g_out.to(torch.float32).contiguous()
        g_last = None if g_last is None else g_last.to(torch.float32).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA = torch.zeros_like(A)
        dB = u.new_zeros(threads, *Bt.shape)
        dC = u.new_zeros(threads, *Ct.shape)
        dD, dbias = u.new_zeros(dim), u.new_zeros(dim)
        lib.scan_bwd(batch, dim, L, N, G, BLOCK, _p(u), _p(delta), _p(A), _p(Bt), _p(Ct), _p(D), _p(z), _p(bias),
                     int(ctx.softplus), _p(ckpt), _p(g_out), _p(g_last), _p(du), _p(ddelta), _p(dz), _p(dA),
                     _p(dB), _p(dC), _p(dD), _p(dbias), threads)
        return (du, ddelta, dA, dB.sum(0), dC.sum(0), dD if D is not None else None, dz,
                dbias if bias is not None else None, None)


def selective_scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused CPU selective scan, differentiable in all tensor inputs; arguments, shapes and result as
    :func:`rs_engine.ops.selective_scan.selective_scan_fn`. Computes in float32 (half inputs too); ``out`` has
    ``u``'s dtype, ``last_state`` is float32.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, or inputs the kernel does not take
            (:func:`fused_cpu_supports`).
        RuntimeError: the kernel could not be built (:func:`fused_cpu_status` says why).
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    if not fused_cpu_supports(u, A):
        raise ValueError("selective scan: the fused CPU kernel takes float32/half CPU tensors with dstate <= 64")
    if not fused_cpu_available():
        raise RuntimeError(fused_cpu_status())
    dtype_in = u.dtype
    batch, dim, length = u.shape
    B, C = as_groups(B, C)
    f32 = [None if t is None else t.to(torch.float32).contiguous() for t in (u, delta, A, D, z, delta_bias)]
    Bt, Ct = (X.to(torch.float32).transpose(-1, -2).contiguous() for X in (B, C))  # token-major (batch, G, L, N)
    if length == 0:
        out = u.new_zeros(u.shape)
        last = torch.zeros(batch, dim, A.shape[1], dtype=torch.float32, device=u.device)
        return (out, last) if return_last_state else out
    fu, fdelta, fA, fD, fz, fbias = f32
    out, last = _FusedScanFn.apply(fu, fdelta, fA, Bt, Ct, fD, fz, fbias, bool(delta_softplus))
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


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
