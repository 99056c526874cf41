"""Numerical kernels: the Mamba-1 selective scan (mamba-ssm's CUDA kernel, a fused C kernel on CPUs, chunked
PyTorch) and the orthonormal DCT-II / DCT-III as cached matrix products."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so that the torch-free kernel module (rs_engine.ops.scan_kernel, which
# OpenVINO's scan operation calls) does not import PyTorch through this package.
_WHERE = {name: "rs_engine.ops.dct" for name in ("dct", "dct2", "dct_matrix", "idct", "idct2")}
_WHERE.update({name: "rs_engine.ops.selective_scan" for name in (
    "DEFAULT_CHUNK_SIZE", "fused_cpu_status", "has_mamba_ssm_cuda", "mamba_ssm_status", "scan_backend",
    "selective_scan_chunked", "selective_scan_fn", "selective_scan_fused", "selective_scan_ref")})


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_WHERE[name])
    # Bind every name of that module here: importing rs_engine.ops.dct has just set this package's ``dct`` to the
    # submodule, and the function must win, as it did when this package imported it eagerly.
    globals().update({n: getattr(module, n) for n, where in _WHERE.items() if where == _WHERE[name]})
    return globals()[name]


__all__ = [
    "dct",
    "dct2",
    "dct_matrix",
    "idct",
    "idct2",
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
