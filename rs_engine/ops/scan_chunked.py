"""The chunked PyTorch selective scan (:func:`selective_scan_chunked`): the CPU backend of
:func:`rs_engine.ops.selective_scan.selective_scan_fn`, differentiable (hand-written backward).

How the chunked scan works, and why
-----------------------------------
The sequence is cut into chunks of ``T`` tokens (``chunk_size``) and chunks into groups of ``G`` chunks sized
so that a group's ``(G*T, dstate, dim)`` work tensors stay in the CPU cache. Per group:

1. ``a = exp2(delta * A*log2(e))`` and ``w = delta*u * B`` for every token of the group, each one vectorised
   op over the whole group (``exp2`` is several times faster than ``exp`` in PyTorch's CPU kernels).
2. Pass 1: one ``addcmul`` per position ``t < T`` across all ``G`` chunks at once gives every chunk's end
   state from a zero start.
3. The only sequential part: the chunk-to-chunk recurrence ``h_in[k+1] = P_k * h_in[k] + e_k`` with
   ``P_k = exp2(A*log2(e) * sum(delta over chunk k))``, one small op per chunk.
4. Pass 2: the same per-position recurrence again, started from the true incoming states, writes the states
   of every token; a batched matrix product with ``C`` reduces them over ``dstate`` to ``y``.

The Python loop count is ``2*T`` per group plus one per chunk -- never one per token. All decays are
``exp`` of a non-positive number (for ``delta >= 0`` and ``A <= 0``, Mamba's case), so nothing overflows:
extreme decays underflow to 0 and the state resets, as in the reference. Every state is the same product
and sum as the sequential recurrence, so the result is exact to float32 rounding (relative error ~1e-6).

Alternatives measured on the target CPU (2 cores, AVX-512) and rejected:

* The log-space cumsum form ``h_t = exp(S_t) * (h_0 + cumsum_s(exp(-S_s) * w_s))``, ``S = A * cumsum(delta)``
  (SSD's chunked form, Dao & Gu 2024, "Transformers are SSMs", sec. 6, applied per state): it needs a second
  transcendental pass (``exp(-S)``), ``torch.cumsum`` is slow on CPU (0.2-1.7 G elements/s) so it needs the
  same per-position loop, and ``exp(-S)`` overflows float32 once a chunk's decay exceeds ``e^-88`` -- which
  trained Mamba models reach (``A`` down to -16 or lower, ``delta`` up to several units).
* The separable matrix (SSD "dual") form ``y = (L o (C e^{S}) (B e^{-S})^T) (delta u)``: Mamba-1 has a
  different decay per state ``n``, so the ``T x T`` matrix costs ``T * dstate`` multiply-adds per token and
  channel instead of ``dstate``; with ``dstate = 16`` batched GEMMs of that size lose to the elementwise form.

What bounds it on a CPU (measured on 2 AVX-512 cores at batch 1, dim 512, dstate 16, L 16384, i.e. 134M
state elements; ~150 ms in all): ``L*dim*dstate`` ``exp2`` evaluations at ~6e9/s (~22 ms); five passes over
the states -- decay product, input product, the two recurrence passes, the contraction -- at 8-15e9
elements/s, mostly from the last-level cache (~65 ms); three ``(batch, dim, L)`` transposes to and from
token-major order at ~1.3e9 elements/s, PyTorch's best copy kernel for them (~18 ms); bias/softplus/D/silu
and slab copies (~25 ms); and ~6.4k op dispatches at ~3 us (~20 ms). The per-token loop of the reference is
bound by 16k iterations of three small ops on strided slices of its precomputed tensors. See ``bench/scan.py``.
Many small parallel ops also make the scan sensitive to CPU oversubscription: run next to another busy
multi-threaded process on the same cores, every OpenMP region waits for a descheduled thread.
"""
from __future__ import annotations

import torch

from rs_engine.ops.chunked_backward import _scan_backward
from rs_engine.ops.chunked_forward import _scan_forward
from rs_engine.ops.scan_contract import as_groups, check_args, compute_dtype

#: Tokens per chunk of the chunked scan. Shorter chunks mean more sequential chunk-to-chunk steps, longer
#: ones fewer chunks per group (smaller ops); 16 was fastest in ``bench/scan.py`` on the target CPU.
DEFAULT_CHUNK_SIZE = 16

#: Elements per work tensor of a group (``batch * G * T * dstate * dim``): 2**20 float32 = 4 MiB, so the two
#: or four work tensors fit the last-level cache while each op is still large enough to amortise dispatch.
_GROUP_ELEMENTS = 1 << 20


class _ChunkedScanFn(torch.autograd.Function):
    """Autograd wrapper: chunked forward, chunked reverse-scan backward (states recomputed per group)."""

    @staticmethod
    def forward(
        ctx,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        softplus: bool,
        chunk_size: int,
        group_elements: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        save = any(ctx.needs_input_grad)
        out, last, states = _scan_forward(
            u, delta, A, B, C, D, z, delta_bias, softplus, chunk_size, group_elements, save
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus, ctx.chunk_size, ctx.group_elements = softplus, chunk_size, group_elements
        return out, last

    @staticmethod
    def backward(ctx, g_out: torch.Tensor | None, g_last: torch.Tensor | None):
        grads = _scan_backward(
            ctx.saved_tensors,
            ctx.softplus,
            ctx.chunk_size,
            ctx.group_elements,
            g_out,
            g_last,
            ctx.needs_input_grad,
        )
        g_u, g_delta, gA, gB, gC, gD, g_z, g_bias = grads
        nd = ctx.needs_input_grad
        pick = [g if need else None for g, need in zip((g_u, g_delta, gA, gB, gC, gD, g_z, g_bias), nd[:8])]
        return (*pick, None, None, None)


def selective_scan_chunked(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch selective scan (any device; built for CPUs), differentiable in all tensor inputs.

    Arguments, shapes and result as :func:`selective_scan_fn`, plus ``chunk_size``: tokens per chunk (the
    length of the per-position loops; the chunk-to-chunk recurrence runs ``L / chunk_size`` steps). The
    algorithm and its cost are described in this module's docstring. Computes in float64 if any input is
    float64, else float32; ``out`` has ``u``'s dtype, ``last_state`` the compute dtype.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, complex ``A``, or ``chunk_size < 1``.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective scan: chunk_size must be >= 1, got {chunk_size}")
    dtype_in = u.dtype
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    B, C = as_groups(B, C)
    conv = [None if t is None else t.to(cdt) for t in (u, delta, A, B, C, D, z, delta_bias)]
    if length == 0:
        out = u.new_zeros(u.shape)
        last = torch.zeros(batch, dim, A.shape[1], dtype=cdt, device=u.device)
        return (out, last) if return_last_state else out
    out, last = _ChunkedScanFn.apply(*conv, bool(delta_softplus), int(chunk_size), _GROUP_ELEMENTS)
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out
