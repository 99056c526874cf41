"""One parser for ``--device`` (``rs-engine`` and ``rs-train``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import re

import torch

from rs_engine.errors import InputError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA GPU when PyTorch sees one, else the CPU; ``cpu``; ``cuda``; ``cuda:N``.

    Raises:
        InputError: an unknown name, CUDA asked for but not available, or a GPU index PyTorch does not see.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise InputError(f"--device {spec}: must be auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {spec}: no CUDA GPU is available to PyTorch here (use --device cpu)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise InputError(f"--device {spec}: PyTorch sees {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    return torch.device(spec)
