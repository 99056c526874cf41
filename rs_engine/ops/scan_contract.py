"""The argument contract every selective-scan backend shares (mamba-ssm's ``selective_scan_fn``, real ``A``)."""

from __future__ import annotations

import torch


def check_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise ValueError for shapes, dtypes or devices outside the contract of :func:`selective_scan_fn`."""
    if A.is_complex() or B.is_complex() or C.is_complex():
        raise ValueError("selective scan: complex A, B or C is not supported (real Mamba-1 only)")
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective scan: delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (dim={dim}, dstate), got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 3:
            ok = X.shape == (batch, dstate, length)
        elif X.dim() == 4:
            ok = X.shape[0] == batch and X.shape[2:] == (dstate, length) and X.shape[1] >= 1
            ok = ok and dim % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective scan: {name} must be (batch, dstate, L) = ({batch}, {dstate}, {length}) or "
                f"(batch, G, dstate, L) with dim % G == 0, got shape {tuple(X.shape)}"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective scan: B and C have different group counts ({B.shape[1]}, {C.shape[1]})")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (dim,):
            raise ValueError(f"selective scan: {name} must be (dim={dim},), got shape {tuple(X.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(not t.is_floating_point() for t in tensors):
        raise ValueError("selective scan: all tensors must be floating point")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("selective scan: all tensors must be on the same device")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32, as mamba-ssm)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def as_groups(B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C as (batch, G, dstate, L): a 3-D one gets G = 1; when one is grouped and the other not, the single
    group is expanded (a view) to the other's count."""
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    if B.shape[1] != C.shape[1]:
        ng = max(B.shape[1], C.shape[1])
        B, C = B.expand(B.shape[0], ng, *B.shape[2:]), C.expand(C.shape[0], ng, *C.shape[2:])
    return B, C
