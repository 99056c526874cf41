"""Orthonormal discrete cosine transforms (DCT-II and its inverse, DCT-III) as matrix products.

For a signal ``x`` of ``N`` samples the orthonormal DCT-II (Ahmed, Natarajan & Rao 1974; the ``norm="ortho"``
convention of ``scipy.fft.dct``) is::

    X[k] = s_k * sum_{n=0}^{N-1} x[n] * cos(pi * k * (n + 0.5) / N),   s_0 = sqrt(1/N), s_k = sqrt(2/N) (k > 0)

i.e. ``X = D x`` with the orthogonal basis matrix ``D[k, n] = s_k cos(pi k (n + 0.5) / N)``. The inverse is the
orthonormal DCT-III, ``x = D^T X``. A 2-D transform over a (H, W) grid applies ``D_H`` along H then ``D_W``
along W (the transform is separable): ``X = D_H x D_W^T``, ``x = D_H^T X D_W``.

Why matrix products rather than an FFT: for the feature-map sides a backbone sees (16-256) a dense (N, N) product
runs as one GEMM on every backend, is seen by ``torch.utils.flop_counter`` (an FFT is not), and costs
``O(N^1.5)`` for ``N = H W`` pixels -- the cost vHeat (Wang et al. 2024, "vHeat: Building Vision Models upon Heat
Conduction") and RS-vHeat (Hu et al. 2025) quote for the Heat Conduction Operator.

Bases are built once per (size, device, dtype) in float64 and cached; they never require gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor


@functools.lru_cache(maxsize=128)
def _basis(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Built outside inference mode so that a basis first made during inference can later be saved for backward.
    with torch.inference_mode(False), torch.no_grad():
        k = torch.arange(n, dtype=torch.float64)[:, None]
        x = torch.arange(n, dtype=torch.float64)[None, :]
        d = torch.cos(math.pi * k * (x + 0.5) / n) * math.sqrt(2.0 / n)
        d[0] /= math.sqrt(2.0)
        return d.to(device=device, dtype=dtype)


def dct_matrix(n: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The (n, n) orthonormal DCT-II basis ``D`` (``X = D @ x``); its transpose is the inverse (DCT-III).

    Args:
        n: number of samples (>= 1).
        device, dtype: of the returned matrix (default: CPU, the default float dtype).

    Returns:
        (n, n) tensor, cached per (n, device, dtype): do not modify it in place.

    Raises:
        ValueError: ``n < 1`` or a non-floating dtype.
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise ValueError(f"DCT basis needs a floating dtype, got {dtype}")
    return _basis(int(n), torch.device(device or "cpu"), dtype)


def _along(x: Tensor, basis: Tensor, dim: int) -> Tensor:
    """``basis`` (N, N) applied to dimension ``dim`` (size N) of ``x``, as one matrix product, no copies."""
    dim = dim % x.ndim
    if dim == x.ndim - 1:
        return x @ basis.T
    n = x.shape[dim]
    rest = math.prod(x.shape[dim + 1:])
    # (prefix, N, rest): the basis multiplies from the left, broadcast over the prefix.
    return torch.matmul(basis, x.reshape(-1, n, rest)).reshape(x.shape)


def dct(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (any shape, floating dtype); same shape as ``x``.

    Equals ``scipy.fft.dct(x, type=2, axis=dim, norm="ortho")``.
    """
    return _along(x, dct_matrix(x.shape[dim], x.device, x.dtype), dim)


def idct(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal DCT-III (inverse of :func:`dct`) along ``dim``; same shape as ``x``.

    Equals ``scipy.fft.idct(x, type=2, axis=dim, norm="ortho")``.
    """
    return _along(x, dct_matrix(x.shape[dim], x.device, x.dtype).T, dim)


def dct2(x: Tensor, dims: Sequence[int] = (-2, -1)) -> Tensor:
    """2-D orthonormal DCT-II over ``dims`` (default the last two, H then W): ``X = D_H x D_W^T``.

    Args:
        x: (..., H, W) (or any layout with ``dims`` naming the two spatial axes, e.g. ``(1, 2)`` for
            channels-last (B, H, W, C)); floating dtype.

    Returns:
        the DCT coefficients, same shape; frequency (0, 0) at index (0, 0). Equals
        ``scipy.fft.dctn(x, axes=dims, norm="ortho")``.
    """
    h, w = dims
    return dct(dct(x, h), w)


def idct2(x: Tensor, dims: Sequence[int] = (-2, -1)) -> Tensor:
    """Inverse of :func:`dct2` (2-D orthonormal DCT-III): ``x = D_H^T X D_W``; same shape as ``x``.

    Equals ``scipy.fft.idctn(x, axes=dims, norm="ortho")``.
    """
    h, w = dims
    return idct(idct(x, h), w)
