"""The selective scan in standard tensor operators only, for export (ONNX) and graph runtimes.

:func:`selective_scan_export` computes what :func:`rs_engine.ops.scan_chunked.selective_scan_chunked` computes
(same chunked algorithm: per-position recurrence inside chunks, then the chunk-to-chunk recurrence, then every
token's state from its chunk's true incoming state), but as a pure function: no ``out=`` arguments, no in-place
writes, no autograd Function, no scratch reuse. Traced by ``torch.onnx.export`` its Python loops unroll into
about ``4*T + 2*L/T`` graph nodes per call, each a whole-tensor operator over every chunk at once, so the loop
count is chosen near ``sqrt(L)`` (:func:`export_chunk_size`). It is inference only (no backward) and slower
than the chunked scan in eager PyTorch (it allocates every intermediate); the graph runtimes fuse and plan it.

:func:`selective_scan_custom_op` traces each scan as one ``delineate::SelectiveScan`` node instead, for a runtime
that runs the fused C kernel there (OpenVINO, :mod:`rs_engine.runtime_openvino`); :func:`custom_op_export` asks for it.

Layout: work tensors are ``(T, chunks, batch, groups, dstate, dim/groups)``, position-major, so the slice
taken at every step of the per-position loops (``x[t]``) and of the chunk loop (``x[k]``) is contiguous.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from rs_engine.ops.scan_contract import as_groups
from rs_engine.ops.scan_kernel import CUSTOM_OP_DOMAIN, CUSTOM_OP_TYPE


def export_chunk_size(length: int) -> int:
    """Tokens per chunk for a sequence of ``length``: the power of two nearest ``sqrt(length)``, at least 4.

    The unrolled graph has ~``4*T`` per-position steps and ~``2*L/T`` chunk steps; ``T ~ sqrt(L)`` balances them.
    """
    return max(4, 2 ** round(math.log2(max(length, 1)) / 2))


def selective_scan_export(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mamba-1 selective scan (the contract of :func:`rs_engine.ops.selective_scan.selective_scan_fn`, real ``A``,
    no last state) made of standard operators only.

    Args:
        u, delta: (batch, dim, L). A: (dim, dstate). B, C: (batch, dstate, L) or (batch, groups, dstate, L).
        D: optional (dim,). z: optional (batch, dim, L) gate. delta_bias: optional (dim,).
        delta_softplus: softplus on ``delta + delta_bias``.
        chunk_size: tokens per chunk; None: :func:`export_chunk_size` of L.

    Returns:
        (batch, dim, L) in ``u``'s dtype, computed in float32 (float64 for float64 inputs).
    """
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    b, d, length = u.shape
    n = A.shape[1]
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    ng = max(B.shape[1], C.shape[1])
    dpg = d // ng
    T = chunk_size or export_chunk_size(length)
    nch = -(-length // T)
    pad = nch * T - length
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if pad:  # padding tokens get delta 0: decay 1, no input, so states pass through them unchanged
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))

    def tokens(x: torch.Tensor, groups: int, inner: int) -> torch.Tensor:
        """(batch, groups*inner, Lp) -> (T, chunks, batch, groups, inner)."""
        return x.reshape(b, groups, inner, nch, T).permute(4, 3, 0, 1, 2)

    dt = tokens(delta, ng, dpg).unsqueeze(4)  # (T, nch, b, ng, 1, dpg)
    du = tokens(delta * u, ng, dpg).unsqueeze(4)
    Bt = tokens(B.expand(b, ng, n, nch * T).reshape(b, ng * n, nch * T), ng, n).unsqueeze(5)  # (.., n, 1)
    Ct = tokens(C.expand(b, ng, n, nch * T).reshape(b, ng * n, nch * T), ng, n).unsqueeze(5)
    Ag = A.reshape(ng, dpg, n).permute(0, 2, 1)  # (ng, n, dpg)
    a = torch.exp(dt * Ag)  # (T, nch, b, ng, n, dpg): decay of every token
    w = du * Bt  # input of every token
    # pass 1: each chunk's end state from a zero start, all chunks at once
    e = w[0]
    for t in range(1, T):
        e = a[t] * e + w[t]
    # chunk-to-chunk recurrence: the state entering each chunk
    P = torch.exp(dt.sum(0) * Ag)  # (nch, b, ng, n, dpg): each chunk's total decay
    h = torch.zeros_like(e[0])
    entering = []
    for k in range(nch):
        entering.append(h)
        h = P[k] * h + e[k]
    s = torch.stack(entering, 0)  # (nch, b, ng, n, dpg)
    # pass 2: every token's state from its chunk's true incoming state, reduced over dstate with C
    ys = []
    for t in range(T):
        s = a[t] * s + w[t]
        ys.append((Ct[t] * s).sum(3))  # (nch, b, ng, dpg)
    y = torch.stack(ys, 0).permute(2, 3, 4, 1, 0).reshape(b, d, nch * T)[:, :, :length]
    u = u[:, :, :length]
    if D is not None:
        y = y + u * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(dtype_in)


# --- one custom node per scan, for runtimes that run the fused kernel (OpenVINO: rs_engine.runtime_openvino) ---

_CUSTOM_OP = contextvars.ContextVar("delineate_scan_custom_op", default=False)


@contextlib.contextmanager
def custom_op_export() -> Iterator[None]:
    """Within it, an ONNX export traces each selective scan as one ``delineate::SelectiveScan`` node
    (:func:`selective_scan_custom_op`) instead of the standard-operator graph."""
    token = _CUSTOM_OP.set(True)
    try:
        yield
    finally:
        _CUSTOM_OP.reset(token)


def custom_op_requested() -> bool:
    return _CUSTOM_OP.get()


class _ScanNode(torch.autograd.Function):
    """Traces as one ``delineate::SelectiveScan(u, delta, A, B, C, D, delta_bias)`` node, attribute
    ``delta_softplus``; B and C are (batch, groups, dstate, L). Its eager value is :func:`selective_scan_export`'s."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, bias, softplus: bool):  # noqa: ANN001, ANN205
        return selective_scan_export(u, delta, A, B, C, D, None, bias, softplus)

    @staticmethod
    def symbolic(g, u, delta, A, B, C, D, bias, softplus: bool):  # noqa: ANN001, ANN205
        node = g.op(f"{CUSTOM_OP_DOMAIN}::{CUSTOM_OP_TYPE}", u, delta, A, B, C, D, bias,
                    delta_softplus_i=int(softplus))
        return node.setType(u.type())


def selective_scan_custom_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """:func:`selective_scan_export`'s contract, traced as one custom node (float32 in and out; missing ``D`` and
    ``delta_bias`` become zeros, the ``z`` gate is applied in standard operators after the node).

    Only a runtime that knows the node runs the graph (``rs_engine.runtime_openvino`` maps it to the fused C
    kernel); the bundled ``.onnx`` files keep the standard-operator scan.
    """
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    B, C = as_groups(B, C)
    zeros = u.new_zeros(u.shape[1])
    D = zeros if D is None else D.float()
    bias = zeros if delta_bias is None else delta_bias.float()
    y = _ScanNode.apply(u, delta, A, B, C, D, bias, bool(delta_softplus))
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)
