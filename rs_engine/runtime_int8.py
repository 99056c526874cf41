"""int8 models for OpenVINO: the post-training-quantized form of a model, ``NAME.int8.xml`` (+ ``.bin``) beside
``NAME.onnx``, made by ``rs-train quantize`` (NNCF; :mod:`training.quantize`).

The file is an OpenVINO IR of the fused-scan graph (:func:`rs_engine.runtime_openvino.fused_scan_graph`) whose
convolutions and matrix products take int8 inputs (FakeQuantize nodes, per-channel weights); everything else
(box decoding, the selective scans, normalisation) stays in floating point. OpenVINO runs it only where it was
made from the same weights: the IR records the digest of the ``.safetensors`` it was quantized from
(:func:`rs_engine.runtime_openvino.scan_graph_digest`), and a retrained model's stale file is skipped with the
reason (``rs-engine -v``). Reading it needs no NNCF: the ``delineate::SelectiveScan`` nodes are rebuilt as
:class:`rs_engine.runtime_openvino.SelectiveScanOp` by an OpenVINO extension.

Why int8: OpenVINO's int8 kernels (AVX-512 VNNI, AVX2, AMX) do 2 to 4 times the multiply-adds per instruction of
its bf16 or f32 ones; on a 512 px nwpu10 tile, one thread, the 2-core AMD EPYC with AVX-512 (no AMX), the whole
network went from 220 to 179 ms (docs/benchmarks.md 2g).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from rs_engine.card import ModelCard

#: The IR's rt_info key holding the digest of the weights it was quantized from.
DIGEST_KEY = ("delineate", "weights_digest")


def int8_file(onnx_path: Path) -> Path:
    """``NAME.int8.xml`` beside ``NAME.onnx`` (or beside ``NAME.safetensors``)."""
    return Path(onnx_path).with_suffix(".int8.xml")


def recorded_digest(xml: Path) -> str | None:
    """The weights digest an IR records (:data:`DIGEST_KEY`), read from its XML text (no model is built), or
    None where it has none. Raises OSError where the file cannot be read."""
    text = Path(xml).read_text(errors="replace")
    m = re.search(rf'<{DIGEST_KEY[1]} value="([0-9a-f]+)"', text)
    return m.group(1) if m else None


def int8_graph(onnx_path: Path, card: ModelCard) -> tuple[Path | None, str]:
    """The int8 IR of ``onnx_path``'s model, or ``(None, why)``: no such file, the fused scan kernel unavailable
    (the IR's scans need it), or an IR quantized from other weights than the ``.safetensors`` beside it."""
    from rs_engine.ops.scan_kernel import fused_cpu_available, fused_cpu_status
    from rs_engine.runtime_openvino import scan_graph_digest

    xml = int8_file(onnx_path)
    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        return None, f"no {xml.name} (rs-train quantize makes it)"
    if not fused_cpu_available():
        return None, fused_cpu_status()
    weights = Path(onnx_path).with_suffix(".safetensors")
    if not weights.is_file():
        return None, f"no {weights.name} beside {xml.name} to check it against"
    try:
        recorded = recorded_digest(xml)
    except OSError as exc:
        return None, f"{xml.name}: {exc.strerror}"
    if recorded != scan_graph_digest(weights, card):
        return None, f"{xml.name} was quantized from other weights than {weights.name} (run rs-train quantize again)"
    return xml, "int8"


@functools.cache
def _register_scan_op() -> None:
    from rs_engine.runtime_openvino import _openvino_core, _selective_scan_op_class

    _openvino_core().add_extension(_selective_scan_op_class())


def read_int8(xml: str | os.PathLike, scan_threads: int = 1) -> Any:
    """OpenVINO's model of an int8 IR, its selective scans on ``scan_threads`` OpenMP threads each."""
    from rs_engine.runtime_openvino import _conversion, _openvino_core

    _register_scan_op()
    _conversion.threads = scan_threads  # read by each SelectiveScanOp the reader constructs
    return _openvino_core().read_model(str(xml))
