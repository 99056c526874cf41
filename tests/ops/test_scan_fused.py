"""The fused CPU selective scan (C kernel, ``rs_engine/ops/scan_fused_cpu.c``) against the float64 reference.

Forward, last state and every gradient in float32 against :func:`selective_scan_ref` in float64, over the shapes
that exercise the kernel's edges: dstate 16 and 8 (its vector paths) and others, L shorter and longer than a block (64)
and not a multiple of it, grouped B/C with channel tiles (16) that do not divide a group, batch > 1, two threads
(per-thread dB/dC accumulators). Then the build: a cached library, ``DELINEATE_SCAN=chunked`` and a machine with
no C compiler fall back to the chunked scan with a status line that says why.
"""

from __future__ import annotations

import pytest
import torch

from rs_engine.ops import scan_kernel
from rs_engine.ops import selective_scan as ss
from rs_engine.ops.scan_fused import fused_cpu_available, fused_cpu_status, selective_scan_fused
from tests.ops.test_selective_scan import EXTREME_DECAYS, _grads, check_extreme_decays, make_inputs, rel_err, split

pytestmark = pytest.mark.skipif(not fused_cpu_available(), reason=f"kernel not built: {fused_cpu_status()}")

# (batch, dim, dstate, L, B/C groups)
SHAPES = [
    (2, 8, 4, 37, None),  # L shorter than a block, dstate 4
    (1, 6, 3, 1, None),  # a single token
    (2, 40, 16, 150, 2),  # dstate 16 (vector path), 20 channels per group: tiles of 16 and 4, 3 blocks
    (3, 4, 16, 64, None),  # exactly one block
    (1, 16, 8, 301, 4),  # dstate 8 (vector path), longer, grouped, odd L
    (2, 40, 8, 150, 2),  # dstate 8, tiles of 16 and 4, 3 blocks
    (1, 24, 16, 257, 3),  # dstate 16, a last block of one token
]
IDS = ["b{}d{}n{}L{}g{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("full", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_forward_and_gradients_match_float64_reference(shape, full):
    batch, dim, dstate, length, groups = shape
    x = make_inputs(batch, dim, dstate, length, groups)
    if not full:
        x["delta"] = x["delta"].abs()
    args, kw = split(x, full)
    y_ref, h_ref = ss.selective_scan_ref(*args, **kw, return_last_state=True)
    x32 = {k: v.float() for k, v in x.items()}
    args32, kw32 = split(x32, full)
    y, h = selective_scan_fused(*args32, **kw32, return_last_state=True)
    assert y.dtype == torch.float32 and y.shape == (batch, dim, length) and h.shape == (batch, dim, dstate)
    assert rel_err(y, y_ref) < 2e-6 and rel_err(h, h_ref) < 2e-6
    assert torch.equal(selective_scan_fused(*args32, **kw32), y)

    ref, got = _grads(ss.selective_scan_ref, x, full, None), _grads(selective_scan_fused, x32, full, None)
    assert set(got) == set(ref)
    for k in ref:
        if ref[k].abs().max() == 0:  # dA with a single token: h_{-1} = 0
            assert got[k].abs().max() < 1e-12, k
        else:
            assert rel_err(got[k], ref[k]) < 2e-5, k


def test_two_threads_equal_one(monkeypatch):
    """Channels split across threads, dB/dC summed from per-thread accumulators: same numbers as one thread."""
    x = {k: v.float() for k, v in make_inputs(2, 40, 16, 130, 2).items()}
    results = []
    for n in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
        results.append(_grads(selective_scan_fused, x, True, None))
    for k in results[0]:
        assert rel_err(results[1][k], results[0][k]) < 1e-6, k


@pytest.mark.parametrize("delta_scale,a_scale", EXTREME_DECAYS)
def test_extreme_decays_stay_finite(delta_scale, a_scale):
    """Decays far below float32's range reset the state (the kernel's exp stops at 2^-126), as in the reference."""
    check_extreme_decays(selective_scan_fused, delta_scale, a_scale)


def test_softplus_edges_and_half_inputs():
    """delta + bias above softplus' threshold (20) passes as is; very negative gives a tiny step; half in/out."""
    x = make_inputs(1, 8, 16, 90)
    args, kw = split(x, full=True)
    args[1] = torch.cat([args[1][:, :, :30] + 30.0, args[1][:, :, 30:60] - 25.0, args[1][:, :, 60:]], dim=2)
    y_ref = ss.selective_scan_ref(*args, **kw)
    args32 = [t.float() for t in args]
    kw32 = {k: v.float() if torch.is_tensor(v) else v for k, v in kw.items()}
    assert rel_err(selective_scan_fused(*args32, **kw32), y_ref) < 2e-6
    for dtype in (torch.float16, torch.bfloat16):
        y = selective_scan_fused(*[t.to(dtype) if i in (0, 1) else t for i, t in enumerate(args32)], **kw32)
        assert y.dtype == dtype and rel_err(y, y_ref) < 2e-2


def test_empty_sequence_and_unsupported_inputs():
    x = {k: v.float() for k, v in make_inputs(2, 4, 3, 0).items()}
    args, kw = split(x, full=True)
    y, h = selective_scan_fused(*args, **kw, return_last_state=True)
    assert y.shape == (2, 4, 0) and h.shape == (2, 4, 3) and not h.any()
    x64 = make_inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match="fused CPU kernel"):
        selective_scan_fused(*split(x64, full=False)[0])
    x_big = {k: v.float() for k, v in make_inputs(1, 4, 65, 5).items()}
    with pytest.raises(ValueError, match="dstate <= 64"):
        selective_scan_fused(*split(x_big, full=False)[0])


def test_build_is_cached_and_falls_back_with_a_reason(monkeypatch, tmp_path):
    """A fresh cache compiles once; DELINEATE_SCAN=chunked and a machine without a C compiler use the chunked
    scan, and the doctor line says why."""
    x = {k: v.float() for k, v in make_inputs(1, 8, 4, 20).items()}
    args, kw = split(x, full=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        scan_kernel._library.cache_clear()
        assert fused_cpu_available()
        built = list((tmp_path / "delineate").glob("scan_fused_cpu-*.so"))
        assert len(built) == 1 and built[0].name in fused_cpu_status()
        assert ss.scan_backend(args[0], args[2]) == "fused_cpu"
        native = selective_scan_fused(*args, **kw)

        scan_kernel._library.cache_clear()  # another -march: another build beside the first, the same numbers
        monkeypatch.setenv(scan_kernel.MARCH_ENV, "x86-64")
        assert fused_cpu_available() and "-march=x86-64 " in fused_cpu_status()
        assert len(list((tmp_path / "delineate").glob("scan_fused_cpu-*.so"))) == 2
        torch.testing.assert_close(selective_scan_fused(*args, **kw), native, rtol=1e-5, atol=1e-6)
        monkeypatch.delenv(scan_kernel.MARCH_ENV)

        scan_kernel._library.cache_clear()
        monkeypatch.setenv("DELINEATE_SCAN", "chunked")
        assert not fused_cpu_available() and "DELINEATE_SCAN=chunked" in fused_cpu_status()
        assert ss.scan_backend(args[0], args[2]) == "chunked"
        assert torch.equal(ss.selective_scan_fn(*args, **kw), ss.selective_scan_chunked(*args, **kw))

        scan_kernel._library.cache_clear()
        monkeypatch.delenv("DELINEATE_SCAN")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
        monkeypatch.setattr(scan_kernel.shutil, "which", lambda name: None)
        monkeypatch.delenv("CC", raising=False)
        assert not fused_cpu_available() and "no C compiler" in fused_cpu_status()
        assert ss.scan_backend(args[0], args[2]) == "chunked"
        with pytest.raises(RuntimeError, match="no C compiler"):
            selective_scan_fused(*args, **kw)
    finally:
        monkeypatch.undo()
        scan_kernel._library.cache_clear()


def test_forward_on_numpy_arrays_matches_float64_reference():
    """The entry OpenVINO's SelectiveScan operation calls: numpy buffers in, ``out`` written in place."""
    import numpy as np

    from rs_engine.ops.scan_fused import scan_forward_arrays

    x = make_inputs(2, 40, 8, 150, 2)
    x["z"] = None
    args, kw = split(x, True)
    kw["z"] = None
    y_ref = ss.selective_scan_ref(*args, **kw)
    f = {k: v.float().numpy() for k, v in x.items() if v is not None}
    Bt, Ct = (np.ascontiguousarray(f[k].transpose(0, 1, 3, 2)) for k in ("B", "C"))
    out = np.full_like(f["u"], np.nan)
    scan_forward_arrays(f["u"], f["delta"], f["A"], Bt, Ct, f["D"], f["delta_bias"], True, out, threads=2)
    assert rel_err(torch.from_numpy(out), y_ref) < 2e-6
