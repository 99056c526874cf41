"""Selective scan: the chunked PyTorch scan against a float64 token-by-token reference, gradients, dispatch.

Ground truth is :func:`selective_scan_ref` run in float64 (a plain Python loop over tokens, as mamba-ssm's
reference). The chunked scan runs in float32 (tolerance ~float32 rounding of a sequential recurrence) and in
float64 (agreement to ~1e-12 shows the algorithm itself is exact). The grouping convention of B/C is checked
independently of both implementations.
"""

from __future__ import annotations

import types

import pytest
import torch

from rs_engine.ops import (
    has_mamba_ssm_cuda,
    mamba_ssm_status,
    scan_backend,
    scan_chunked,
    selective_scan_chunked,
    selective_scan_fn,
    selective_scan_ref,
)
from rs_engine.ops import selective_scan as ss

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch: int,
    dim: int,
    dstate: int,
    length: int,
    groups: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs shaped like a Mamba layer's: A = -(1..N) perturbed, delta around softplus(-1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    a_log = torch.log(torch.arange(1, dstate + 1, dtype=torch.float64)).expand(dim, dstate) + 0.3 * rnd(dim, dstate)
    x = {
        "u": rnd(batch, dim, length),
        "delta": 0.5 * rnd(batch, dim, length) - 1.0,
        "A": -torch.exp(a_log),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim),
        "z": rnd(batch, dim, length),
        "delta_bias": 0.3 * rnd(dim),
    }
    return {k: v.to(dtype) for k, v in x.items()}


def split(x: dict[str, torch.Tensor], full: bool) -> tuple[list[torch.Tensor], dict]:
    """Positional (u, delta, A, B, C) and keyword arguments; ``full`` adds D, z, delta_bias and softplus."""
    args = [x[k] for k in NAMES[:5]]
    kw: dict = {}
    if full:
        kw = {"D": x["D"], "z": x["z"], "delta_bias": x["delta_bias"], "delta_softplus": True}
    else:
        args[1] = args[1].abs()  # no softplus: keep delta >= 0 as Mamba does
    return args, kw


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)).item()


@pytest.fixture(params=["default groups", "1-chunk groups", "3-chunk groups"])
def set_groups(request, monkeypatch):
    """Returns ``f(batch, dim, dstate, chunk)`` that sets the group size: the default (one group at these
    sizes), one chunk per group, or three chunks per group (so a shorter last group occurs)."""

    def f(batch: int, dim: int, dstate: int, chunk: int) -> None:
        per_chunk = batch * chunk * dstate * dim
        if request.param == "1-chunk groups":
            monkeypatch.setattr(scan_chunked, "_GROUP_ELEMENTS", 1)
        elif request.param == "3-chunk groups":
            monkeypatch.setattr(scan_chunked, "_GROUP_ELEMENTS", 3 * per_chunk)

    return f


# (batch, dim, dstate, L, B/C groups, chunk size)
SHAPES = [
    (2, 8, 4, 37, None, 4),  # L not divisible by the chunk size
    (1, 6, 3, 1, None, 16),  # a single token
    (2, 8, 4, 50, 2, 8),  # grouped B/C
    (3, 4, 16, 64, None, 16),  # L divisible by the chunk size, dstate 16
    (1, 16, 8, 301, 4, 16),  # longer, grouped, odd L
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}n{}L{}g{}T{}".format(*s))
@pytest.mark.parametrize("full", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_forward_matches_float64_reference(shape, full, set_groups):
    batch, dim, dstate, length, groups, chunk = shape
    set_groups(batch, dim, dstate, chunk)
    x64 = make_inputs(batch, dim, dstate, length, groups)
    args, kw = split(x64, full)
    y_ref, h_ref = selective_scan_ref(*args, **kw, return_last_state=True)

    args32 = [t.float() for t in args]
    kw32 = {k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()}
    y, h = selective_scan_chunked(*args32, **kw32, return_last_state=True, chunk_size=chunk)
    assert y.dtype == torch.float32 and y.shape == (batch, dim, length)
    assert h.dtype == torch.float32 and h.shape == (batch, dim, dstate)
    assert rel_err(y, y_ref) < 2e-5
    assert rel_err(h, h_ref) < 2e-5
    y_only = selective_scan_chunked(*args32, **kw32, chunk_size=chunk)
    assert torch.equal(y_only, y)

    # in float64 the chunked scan is the same recurrence up to rounding: agreement to ~1e-12
    y64, h64 = selective_scan_chunked(*args, **kw, return_last_state=True, chunk_size=chunk)
    assert y64.dtype == torch.float64
    assert rel_err(y64, y_ref) < 1e-12
    assert rel_err(h64, h_ref) < 1e-12


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunk_sizes_agree(chunk):
    x = make_inputs(2, 8, 4, 70)
    args, kw = split(x, full=True)
    y_ref = selective_scan_ref(*args, **kw)
    assert rel_err(selective_scan_chunked(*args, **kw, chunk_size=chunk), y_ref) < 1e-12


def test_grouped_bc_convention():
    """Channel d reads group d // (dim // G): same as scanning each block of channels with its own B, C."""
    batch, dim, dstate, length, groups = 2, 12, 4, 29, 3
    x = make_inputs(batch, dim, dstate, length, groups)
    args, kw = split(x, full=False)
    u, delta, A, B, C = args
    y = selective_scan_chunked(u, delta, A, B, C, chunk_size=8)
    per = dim // groups
    for g in range(groups):
        ch = slice(g * per, (g + 1) * per)
        y_g = selective_scan_ref(u[:, ch], delta[:, ch], A[ch], B[:, g], C[:, g])
        assert rel_err(y[:, ch], y_g) < 1e-12


def test_half_precision_inputs_return_their_dtype():
    x = make_inputs(1, 8, 4, 40)
    args, kw = split(x, full=True)
    y_ref = selective_scan_ref(*args, **kw)
    for dtype in (torch.float16, torch.bfloat16):
        args_h = [t.to(dtype) if i in (0, 1) else t.float() for i, t in enumerate(args)]
        kw_h = {k: v.to(dtype) if k == "z" else (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
        y = selective_scan_chunked(*args_h, **kw_h)
        assert y.dtype == dtype
        assert rel_err(y, y_ref) < 2e-2  # input rounding to 8-11 bits dominates


def _grads(fn, x: dict[str, torch.Tensor], full: bool, chunk: int | None, seed: int = 1):
    """Gradients of sum(out * gy) + sum(last_state * gh) w.r.t. every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    args, kw = split(leaves, full)
    if not full:
        args[1] = leaves["delta"]  # differentiate w.r.t. the leaf; inputs are made non-negative below
    extra = {} if chunk is None else {"chunk_size": chunk}
    out, last = fn(*args, **kw, return_last_state=True, **extra)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gh = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    loss = (out * gy).sum() + (last * gh).sum()
    used = [k for k in NAMES if full or k in NAMES[:5]]
    return dict(zip(used, torch.autograd.grad(loss, [leaves[k] for k in used]), strict=True))


@pytest.mark.parametrize(
    "shape",
    [(2, 8, 4, 37, None, 4), (2, 8, 4, 50, 2, 8), (1, 4, 3, 1, None, 16)],
    ids=["odd-L", "grouped", "L1"],
)
@pytest.mark.parametrize("full", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_gradients_match_float64_reference(shape, full, set_groups):
    batch, dim, dstate, length, groups, chunk = shape
    set_groups(batch, dim, dstate, chunk)
    x = make_inputs(batch, dim, dstate, length, groups)
    if not full:
        x["delta"] = x["delta"].abs()
    ref = _grads(selective_scan_ref, x, full, None)
    got = _grads(selective_scan_chunked, x, full, chunk)
    assert set(got) == set(ref)
    for k in ref:
        if ref[k].abs().max() == 0:  # e.g. dA with a single token: h_{-1} = 0
            assert got[k].abs().max() < 1e-12, k
        else:
            assert rel_err(got[k], ref[k]) < 1e-10, k
    # float32 gradients: float32 accuracy
    x32 = {k: v.float() for k, v in x.items()}
    got32 = _grads(selective_scan_chunked, x32, full, chunk)
    for k in ref:
        if ref[k].abs().max() > 0:
            assert rel_err(got32[k], ref[k]) < 1e-4, k


def test_gradcheck_float64():
    x = make_inputs(1, 4, 2, 7, groups=2, seed=3)
    leaves = [x[k].detach().clone().requires_grad_() for k in NAMES]

    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_chunked(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, return_last_state=True, chunk_size=3
        )

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


EXTREME_DECAYS = [(1e3, 1.0), (5.0, 50.0), (1e3, 1e3), (1e-6, 1e-3)]


def check_extreme_decays(fn, delta_scale: float, a_scale: float, **kw) -> None:
    """Huge or tiny delta*A through ``fn`` in float32: no inf/nan in outputs and gradients, and the reference's
    values (a log-space scan would overflow)."""
    x = make_inputs(2, 8, 16, 45)
    args, _ = split(x, full=False)
    args[1] = args[1] * delta_scale
    args[2] = args[2] * a_scale
    y_ref, h_ref = selective_scan_ref(*args, return_last_state=True)
    args32 = [t.float().requires_grad_() for t in args]
    y, h = fn(*args32, return_last_state=True, **kw)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert rel_err(y, y_ref) < 2e-5 and rel_err(h, h_ref) < 2e-5
    (y.sum() + h.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in args32)


@pytest.mark.parametrize("delta_scale,a_scale", EXTREME_DECAYS)
def test_extreme_decays_stay_finite(delta_scale, a_scale, set_groups):
    set_groups(2, 8, 16, 16)
    check_extreme_decays(selective_scan_chunked, delta_scale, a_scale, chunk_size=16)


def test_softplus_of_large_delta_is_linear():
    """delta + bias above softplus' threshold (20) is used as is, as in mamba-ssm."""
    x = make_inputs(1, 4, 4, 20)
    args, kw = split(x, full=True)
    args[1] = args[1] + 30.0
    y = selective_scan_chunked(*args, **kw)
    assert rel_err(y, selective_scan_ref(*args, **kw)) < 1e-12


def test_empty_sequence():
    x = make_inputs(2, 4, 3, 0)
    args, kw = split(x, full=True)
    y, h = selective_scan_chunked(*args, **kw, return_last_state=True)
    assert y.shape == (2, 4, 0) and h.shape == (2, 4, 3) and not h.any()


def test_invalid_arguments_raise_value_error():
    x = make_inputs(1, 6, 4, 10)
    args, _ = split(x, full=False)
    u, delta, A, B, C = args
    with pytest.raises(ValueError, match="complex"):
        selective_scan_fn(u, delta, A.to(torch.complex128), B, C)
    with pytest.raises(ValueError, match="delta shape"):
        selective_scan_fn(u, delta[:, :, :5], A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_fn(u, delta, A, B[:, :3], C)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_fn(u, delta, A, B.view(1, 1, 4, 10).expand(1, 4, 4, 10), C)  # 6 % 4 != 0
    with pytest.raises(ValueError, match="D must be"):
        selective_scan_fn(u, delta, A, B, C, D=torch.ones(5, dtype=u.dtype))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(u, delta, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="floating point"):
        selective_scan_fn(u, delta, A, B, C.long())


def test_dispatcher_never_sends_cpu_tensors_to_mamba_ssm(monkeypatch):
    """CPU tensors never reach mamba-ssm, even when it imports (they get the fused C kernel, or the chunked scan
    where it cannot be built or for float64); CUDA tensors would."""

    def fake_kernel(*args, **kwargs):
        raise AssertionError("mamba-ssm kernel called for CPU tensors")

    monkeypatch.setattr(ss, "_load_mamba_ssm", lambda: (fake_kernel, "fake"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    x = make_inputs(1, 8, 4, 33, dtype=torch.float32)
    args, kw = split(x, full=True)
    cpu = "fused_cpu" if ss.fused_cpu_available() else "chunked"
    assert scan_backend(args[0], args[2]) == cpu
    y = selective_scan_fn(*args, **kw)
    expected = ss.selective_scan_fused(*args, **kw) if cpu == "fused_cpu" else selective_scan_chunked(*args, **kw)
    assert torch.equal(y, expected)
    x64 = make_inputs(1, 8, 4, 33)
    assert scan_backend(x64["u"], x64["A"]) == "chunked"  # float64: the PyTorch path
    fake_cuda = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)
    assert scan_backend(fake_cuda) == "mamba_ssm"
    monkeypatch.setattr(ss, "_load_mamba_ssm", lambda: (None, "not importable"))
    assert scan_backend(fake_cuda) == "chunked"
    assert "not importable" in mamba_ssm_status()


def test_mamba_ssm_probe_is_safe(monkeypatch):
    if not torch.cuda.is_available():
        assert has_mamba_ssm_cuda() is False
        assert mamba_ssm_status() == "mamba-ssm CUDA kernel: not used (CUDA not available)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ss, "_load_mamba_ssm", lambda: (None, "mamba_ssm not importable (ImportError: x)"))
    assert has_mamba_ssm_cuda() is False
    status = "selective scan: chunked PyTorch on CUDA tensors (mamba_ssm not importable (ImportError: x))"
    assert mamba_ssm_status() == status
    monkeypatch.setattr(ss, "_load_mamba_ssm", lambda: (object(), "mamba_ssm imported"))
    assert has_mamba_ssm_cuda() is True
    assert mamba_ssm_status() == "selective scan: mamba-ssm CUDA kernel for CUDA tensors"


CUDA_AND_MAMBA = torch.cuda.is_available() and has_mamba_ssm_cuda()


@pytest.mark.skipif(not CUDA_AND_MAMBA, reason="needs a CUDA device and an importable mamba_ssm")
@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_kernel_matches_reference_and_chunked(groups):
    x = make_inputs(2, 64, 16, 300, groups)
    args, kw = split(x, full=True)
    y_ref, h_ref = selective_scan_ref(*args, **kw, return_last_state=True)
    cuda = [t.float().cuda() for t in args]
    kw_cuda = {k: v.float().cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
    assert scan_backend(cuda[0]) == "mamba_ssm"
    y, h = selective_scan_fn(*cuda, **kw_cuda, return_last_state=True)
    assert rel_err(y.cpu(), y_ref) < 1e-4 and rel_err(h.cpu(), h_ref) < 1e-4
    y_ch = selective_scan_chunked(*cuda, **kw_cuda)
    assert rel_err(y_ch.cpu(), y_ref) < 2e-5
