"""Selective scan with Mamba-1 semantics: mamba-ssm's CUDA kernel on CUDA, a fused C kernel on CPUs, a chunked PyTorch
scan where neither can run.

The scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", eq. 2a-2b and
Algorithm 2), per batch ``b``, channel ``d`` and state ``n``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t
    out = y * silu(z)                                              (when z is given)

Five implementations share that contract (the one of mamba-ssm's
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, real ``A`` only):

* :func:`selective_scan_fn` -- the dispatcher: mamba-ssm's fused kernel when the tensors are on CUDA and
  ``mamba_ssm`` imports; :func:`selective_scan_fused` for float32/half CPU tensors when its C kernel builds;
  otherwise :func:`selective_scan_chunked`.
* :func:`rs_engine.ops.scan_fused.selective_scan_fused` -- one pass per row, state in registers, forward and
  backward in C (compiled on first use with the machine's C compiler), differentiable.
* :func:`selective_scan_chunked` -- pure PyTorch, any device and dtype (float64 too), differentiable
  (hand-written backward).
* :func:`rs_engine.ops.scan_export.selective_scan_export` -- standard operators only, what an ONNX export
  traces (inference; ``rs-engine export``).
* :func:`selective_scan_ref` -- the slow reference: decays and inputs precomputed for every token, then a
  Python loop over tokens, as mamba-ssm's ``selective_scan_ref``. It runs in whatever floating dtype it is
  given, so tests use it in float64 as ground truth.

One file per part, as mamba-ssm's ``selective_scan_interface.py`` and its kernels: the contract's checks
(:mod:`rs_engine.ops.scan_contract`), the reference (:mod:`rs_engine.ops.scan_reference`) and the chunked
backends (:mod:`rs_engine.ops.scan_fused` with ``scan_fused_cpu.c``; :mod:`rs_engine.ops.scan_chunked`, its steps in
``chunked_forward`` / ``chunked_backward``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from rs_engine.ops.scan_chunked import DEFAULT_CHUNK_SIZE, selective_scan_chunked
from rs_engine.ops.scan_contract import check_args
from rs_engine.ops.scan_export import custom_op_requested, selective_scan_custom_op, selective_scan_export
from rs_engine.ops.scan_fused import (
    fused_cpu_available,
    fused_cpu_status,
    fused_cpu_supports,
    selective_scan_fused,
)
from rs_engine.ops.scan_reference import selective_scan_ref

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "fused_cpu_status",
    "has_mamba_ssm_cuda",
    "mamba_ssm_status",
    "scan_backend",
    "selective_scan_chunked",
    "selective_scan_fn",
    "selective_scan_fused",
    "selective_scan_ref",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# mamba-ssm detection and dispatch
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_mamba_ssm() -> tuple[Callable[..., object] | None, str]:
    """Import mamba-ssm's ``selective_scan_fn`` once; return it (or None) and a one-line status."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
    except Exception as exc:  # ImportError, or a build whose CUDA extension fails to load (OSError, ...)
        logger.debug("mamba_ssm not usable: %s: %s", type(exc).__name__, exc)
        return None, f"mamba_ssm not importable ({type(exc).__name__}: {exc})"
    return fn, "mamba_ssm imported"


def has_mamba_ssm_cuda() -> bool:
    """True when mamba-ssm's CUDA selective-scan kernel can be used: CUDA is available and mamba_ssm imports.

    The import is attempted once, lazily, and cached; mamba_ssm is never required.
    """
    return torch.cuda.is_available() and _load_mamba_ssm()[0] is not None


def mamba_ssm_status() -> str:
    """One line for ``rs-engine doctor``: which selective-scan backend CUDA tensors get, and why."""
    if not torch.cuda.is_available():
        return "mamba-ssm CUDA kernel: not used (CUDA not available)"
    fn, status = _load_mamba_ssm()
    if fn is None:
        return f"selective scan: chunked PyTorch on CUDA tensors ({status})"
    return "selective scan: mamba-ssm CUDA kernel for CUDA tensors"


def scan_backend(u: torch.Tensor, A: torch.Tensor | None = None) -> str:
    """Name the implementation :func:`selective_scan_fn` uses for input ``u`` (and state matrix ``A``):
    ``"mamba_ssm"``, ``"fused_cpu"`` or ``"chunked"``.

    mamba-ssm's kernel handles float32/float16/bfloat16 on CUDA; the fused C kernel the same dtypes on the CPU
    (dstate <= 64) once it has been built; everything else (float64, other devices) takes the PyTorch path.
    """
    if u.is_cuda:
        if u.dtype in (torch.float32, torch.float16, torch.bfloat16) and has_mamba_ssm_cuda():
            return "mamba_ssm"
        return "chunked"
    if fused_cpu_supports(u, A) and fused_cpu_available():
        return "fused_cpu"
    return "chunked"


def selective_scan_fn(
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
    """Mamba-1 selective scan with the semantics of mamba-ssm's ``selective_scan_fn`` (real ``A``).

    Args:
        u: (batch, dim, L) input.
        delta: (batch, dim, L) step sizes (before ``delta_bias`` and softplus).
        A: (dim, dstate) real state matrix (Mamba uses ``-exp(A_log)``).
        B: (batch, dstate, L), or (batch, G, dstate, L) with channel ``d`` using group ``d // (dim // G)``.
        C: as ``B``.
        D: optional (dim,) skip connection: adds ``D * u``.
        z: optional (batch, dim, L) gate: the output is multiplied by ``silu(z)``.
        delta_bias: optional (dim,) added to ``delta``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last token.

    Returns:
        ``out`` (batch, dim, L) in ``u``'s dtype, or ``(out, last_state)`` with last_state (batch, dim, dstate)
        in the compute dtype (float32, or float64 for float64 inputs).

    Uses mamba-ssm's fused CUDA kernel when the tensors are on CUDA and ``mamba_ssm`` imports, the fused C kernel
    for float32/half CPU tensors (see :func:`scan_backend`), else :func:`selective_scan_chunked`.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, or complex ``A``.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    if torch.onnx.is_in_onnx_export():  # standard operators only, so the graph needs no custom op
        if return_last_state:
            raise ValueError("selective scan: return_last_state is not exportable")
        if custom_op_requested():  # one custom node per scan, for OpenVINO's fused-kernel operation
            return selective_scan_custom_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return selective_scan_export(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    backend = scan_backend(u, A)
    if backend == "mamba_ssm":
        fn = _load_mamba_ssm()[0]
        assert fn is not None
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)  # type: ignore[return-value]
    if backend == "fused_cpu":
        return selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size=DEFAULT_CHUNK_SIZE
    )
