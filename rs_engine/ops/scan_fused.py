"""The fused CPU selective scan (:func:`selective_scan_fused`): one pass per (batch, channel) over the sequence,
the state in registers, forward and backward, in C (``scan_fused_cpu.c``), compiled on first use by
:mod:`rs_engine.ops.scan_kernel` (which also calls it without PyTorch).

Why C: the recurrence is sequential in ``L``, so a CPU scan is fast only when each step is a few vector
instructions on a state held in registers (mamba-ssm's CUDA kernel and llama.cpp's ``ssm_scan`` work this way).
numba was measured first and rejected: without SVML its ``exp`` is a scalar call per state, slower than the chunked
PyTorch scan. The kernel is plain C with its own vectorisable ``exp`` (Cephes, ~1 ulp). Where no compiler works,
:func:`fused_cpu_status` says why and the dispatcher keeps the chunked PyTorch scan.

Backward (as mamba-ssm's): the forward keeps the state at the start of every block of 64 tokens
(``(batch, dim, L / 64, dstate)`` floats); the backward recomputes each block's states from it in reverse block
order and runs the adjoint recurrence ``lambda_{t-1} = a_t * (lambda_t + C_t * dy_t)``. Threads split the
channels; ``dB`` and ``dC`` are summed over channels, so each thread accumulates its own copy.

Set ``DELINEATE_SCAN=chunked`` to force the PyTorch scan (benchmarks, or to rule the kernel out).
"""

from __future__ import annotations

import torch

from rs_engine.ops.scan_contract import as_groups, check_args
from rs_engine.ops.scan_kernel import (  # noqa: F401 (the kernel's build and status, as before their own module)
    BLOCK,
    MAX_DSTATE,
    _library,
    fused_cpu_available,
    fused_cpu_status,
    scan_forward_arrays,
)


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
