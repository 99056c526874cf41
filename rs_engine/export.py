"""``rs-engine export``: a PyTorch model file -> one ONNX graph that ONNX Runtime runs without PyTorch.

The whole network is exported (backbone, FPN, RPN, RoI box head and mask head; torchvision's detection models
trace to ONNX with their own tracing paths) for one (C, T, T) tile at a fixed tile size, by
``torch.onnx.export``'s TorchScript tracer (opset 17). The selective scans trace through
:func:`rs_engine.ops.scan_export.selective_scan_export`, made of standard operators, instead of the chunked
scan's autograd Function (which would export as an opaque ``PythonOp``).

Outputs: ``boxes`` (K, 4), ``labels`` (K,), ``scores`` (K,) and ``roi_masks`` (K, 1, M, M), each mask in its
box's frame: the engine pastes it into the box's window of the tile (:mod:`rs_engine.maskpaste`), so no full-tile
plane per detection is ever made. The model card goes into the graph's ``metadata_props`` under
``"model_card"``, with ``provenance["onnx"]`` saying what the graph fixed: tile size, box-score floor, opset.
Weights are stored as float16 (the bundled ``.safetensors`` are float16 already, so nothing is lost) and cast to
float32 once, when ONNX Runtime folds the ``Cast`` nodes at session creation, so the file is half the size and
inference still runs in float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from rs_engine.card import CARD_KEY, _first_line
from rs_engine.errors import InputError, raise_write_error, remove_quietly

log = logging.getLogger(__name__)

OPSET = 17
#: Initialisers smaller than this stay float32 (biases, norms: the Cast nodes would cost more than they save).
_HALF_MIN_ELEMENTS = 1024


def export_onnx(
    spec: str | os.PathLike,
    out: str | os.PathLike,
    tile_size: int | None = None,
    min_score: float | None = None,
    half: bool = True,
    overwrite: bool = False,
    scan_op: bool = False,
) -> Path:
    """Export a model (bundled name or ``.safetensors`` path) as ONNX to ``out``; returns ``out``.

    Args:
        tile_size: the tile side in pixels the graph takes; None: the card's ``tile_size``.
        min_score: box-score floor inside the graph (detections below it are never returned); None: the card's
            ``score_threshold``. ``segment --score-threshold`` can raise it, not lower it.
        half: store weights as float16 (computed in float32).
        overwrite: replace an existing ``out``.
        scan_op: trace each selective scan as one ``delineate::SelectiveScan`` node
            (:func:`rs_engine.ops.scan_export.selective_scan_custom_op`): the graph OpenVINO runs with the fused C
            kernel (:mod:`rs_engine.runtime_openvino`); ONNX Runtime cannot run it.

    Raises:
        InputError: unknown or unreadable model, a model whose masks come from a prompt head (``head = "prompt"``),
            a bad tile size, ``out`` exists (without ``overwrite``) or cannot be written, or a network the exporter
            cannot express (one line; nothing is left at ``out``).
    """
    import torch

    from rs_engine.checkpoint import load_model
    from rs_engine.ops.scan_export import custom_op_export

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the output must be an .onnx file")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: exists (use --overwrite to replace it)")
    model, card = load_model(spec, "cpu")
    if card.architecture.get("head") == "prompt":  # per-detection Python loops (box chunks) the tracer would freeze
        raise InputError(f"{spec}: its masks come from a prompt head (head = prompt), which rs-engine export does "
                         "not support; run it with --runtime torch")
    size = tile_size or card.tile_size
    if size < 64 or size % 32:
        raise InputError(f"--tile-size {size}: use a multiple of 32, at least 64")
    floor = card.score_threshold if min_score is None else min_score
    if not 0 <= floor <= 1:
        raise InputError(f"--min-score {floor}: use a value from 0 to 1")
    model.roi_heads.score_thresh = floor
    model.transform.min_size, model.transform.max_size = (size,), size
    model.transform.paste = False  # masks in their boxes' frames (roi_masks); the engine pastes them (maskpaste)
    card.tile_size = size
    card.provenance = {**card.provenance, "onnx": {"tile_size": size, "min_score": floor, "opset": OPSET}}
    image = torch.rand(card.bands, size, size)
    folder = out.parent if str(out.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        with custom_op_export() if scan_op else contextlib.nullcontext():
            _trace(model, image, tmp, spec)
        _finish(tmp, card.to_json(), half)
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual permissions
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise_write_error(out, exc)
    finally:
        if tmp is not None:
            remove_quietly(tmp)
    log.info("exported %s (%s, %d px tiles) to %s", spec, card.label, size, out)
    return out


def _trace(model, image, path: str, spec) -> None:
    """``torch.onnx.export`` of the model on one tile; an exporter failure becomes one InputError line."""
    import torch

    from rs_engine.runtime import ONNX_INPUT, ONNX_OUTPUTS

    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings on torchvision's Python control flow are expected
            torch.onnx.export(model, ([image],), path, opset_version=OPSET, input_names=[ONNX_INPUT],
                              output_names=list(ONNX_OUTPUTS), dynamo=False)  # fmt: skip
    except OSError:
        raise
    except Exception as exc:  # the exporter's errors are many classes (RuntimeError, SymbolicValueError, ...)
        raise InputError(f"{spec}: cannot be exported to ONNX ({type(exc).__name__}: {_first_line(exc)})") from None


def _finish(path: str, card_json: str, half: bool) -> None:
    """Add the card, store large float weights as float16 behind Cast nodes, check the graph, save in place."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(path)
    if half:
        graph, casts = m.graph, []
        for init in graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims) < _HALF_MIN_ELEMENTS:
                continue
            name = init.name
            half_name = f"{name}__fp16"
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), half_name))
            casts.append(helper.make_node("Cast", [half_name], [name], to=onnx.TensorProto.FLOAT))
        for node in reversed(casts):
            graph.node.insert(0, node)
    del m.metadata_props[:]
    m.metadata_props.add(key=CARD_KEY, value=card_json)
    m.metadata_props.add(key="format", value="delineate")
    m.producer_name = "delineate rs-engine export"
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"exported graph is not valid ONNX ({_first_line(exc)})") from None
    onnx.save(m, path)
