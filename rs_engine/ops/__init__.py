"""Numerical kernels: the Mamba-1 selective scan (mamba-ssm's CUDA kernel, a fused C kernel on CPUs, chunked
PyTorch) and the orthonormal DCT-II / DCT-III as cached matrix products."""

from rs_engine.ops.dct import dct, dct2, dct_matrix, idct, idct2
from rs_engine.ops.selective_scan import (
    DEFAULT_CHUNK_SIZE,
    fused_cpu_status,
    has_mamba_ssm_cuda,
    mamba_ssm_status,
    scan_backend,
    selective_scan_chunked,
    selective_scan_fn,
    selective_scan_fused,
    selective_scan_ref,
)

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
