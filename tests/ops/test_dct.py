"""The orthonormal DCT (rs_engine.ops.dct) against scipy.fft, round trips, layouts and caching."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from rs_engine.ops import dct, dct2, dct_matrix, idct, idct2


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (16, 16), (3, 2, 31, 64)])
def test_dct2_matches_scipy(shape) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    want = scipy.fft.dctn(x.astype(np.float64), axes=(-2, -1), norm="ortho")
    got = dct2(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    inv = idct2(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(inv, scipy.fft.idctn(x.astype(np.float64), axes=(-2, -1), norm="ortho"),
                               atol=1e-5, rtol=1e-5)


def test_1d_along_any_dim_matches_scipy() -> None:
    x = torch.randn(4, 9, 6, 3, dtype=torch.float64)
    for dim in range(4):
        want = scipy.fft.dct(x.numpy(), type=2, axis=dim, norm="ortho")
        np.testing.assert_allclose(dct(x, dim).numpy(), want, atol=1e-12)
        back = scipy.fft.idct(x.numpy(), type=2, axis=dim, norm="ortho")
        np.testing.assert_allclose(idct(x, dim).numpy(), back, atol=1e-12)


def test_channels_last_layout() -> None:
    x = torch.randn(2, 12, 10, 5)  # (B, H, W, C)
    want = scipy.fft.dctn(x.double().numpy(), axes=(1, 2), norm="ortho")
    np.testing.assert_allclose(dct2(x, dims=(1, 2)).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(dtype) -> None:
    x = torch.randn(2, 3, 40, 24, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(idct2(dct2(x)), x, atol=tol, rtol=tol)
    torch.testing.assert_close(dct2(idct2(x)), x, atol=tol, rtol=tol)


def test_basis_is_orthonormal_and_cached() -> None:
    d = dct_matrix(17, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(17, dtype=torch.float64))
    assert dct_matrix(17, dtype=torch.float64) is d  # cached per (size, device, dtype)
    assert dct_matrix(17, dtype=torch.float32) is not d
    # row 0 is the mean (DC) term: constant 1/sqrt(N)
    torch.testing.assert_close(d[0], torch.full((17,), 17**-0.5, dtype=torch.float64))


def test_basis_made_in_inference_mode_supports_backward() -> None:
    with torch.inference_mode():
        dct2(torch.randn(1, 13, 11))
    x = torch.randn(1, 13, 11, requires_grad=True)
    dct2(x).square().sum().backward()  # orthonormal: d/dx ||Dx||^2 = 2x
    torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-5, rtol=1e-5)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        dct_matrix(0)
    with pytest.raises(ValueError):
        dct_matrix(4, dtype=torch.int64)
