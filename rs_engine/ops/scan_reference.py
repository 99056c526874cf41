"""The slow reference selective scan, ground truth of the tests (in float64), as mamba-ssm's ``selective_scan_ref``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rs_engine.ops.scan_contract import check_args, compute_dtype


def selective_scan_ref(
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
    """Slow reference selective scan: a Python loop over tokens, as mamba-ssm's ``selective_scan_ref``.

    ``exp(delta*A)`` and ``delta*B*u`` are precomputed for all tokens as ``(batch, dim, L, dstate)`` tensors
    (memory grows with ``L*dim*dstate``), then ``h = dA_t*h + dBu_t; y_t = <h, C_t>`` runs token by token.

    Args and returns: as :func:`selective_scan_fn`. Computes in float64 if any input is float64, else in
    float32; ``out`` has ``u``'s dtype, ``last_state`` the compute dtype.

    Raises:
        ValueError: shapes, dtypes or devices outside the contract, or complex ``A``.
    """
    check_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    if B.dim() == 4:  # (batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim // G)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 3:
        delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(length):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        if C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    out = y if D is None else y + u * D.to(cdt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out
