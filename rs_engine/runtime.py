"""Runtimes: what runs the network on the tiles. PyTorch (``.safetensors`` models), ONNX Runtime or OpenVINO
(both on the ``.onnx`` form).

A predictor is ``predictor(list of (C, T, T) float32 normalised arrays) -> list of dicts`` with ``boxes`` (K, 4)
x1y1x2y2 tile pixels, ``labels`` (K,) 1..num_classes, ``scores`` (K,) 0-1 and ``roi_masks`` (K, 1, M, M)
probabilities in each box's frame (the mask head's output), as numpy arrays, whichever runtime computes it; the
pipeline pastes them box by box (:mod:`rs_engine.maskpaste`). A predictor may return full-tile ``masks``
(K, 1, T, T) instead (torchvision's eval-mode convention: a prompt-head model, a graph exported before
box-frame masks).
The pipeline (:mod:`rs_engine.pipeline`) sees only that, so tiling, merging and writing are one code path.

``--runtime auto`` takes OpenVINO on the CPU where it is installed and the model has an ``.onnx`` form; else ONNX
Runtime for an ``.onnx`` file or when PyTorch is not installed (the light engine, ``pip install delineate``), and
PyTorch for the rest (:func:`choose_runtime`).
Nothing here imports PyTorch or OpenVINO unless it runs them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rs_engine.card import ModelCard, _first_line, bundled_models, read_card, resolve_model
from rs_engine.errors import InputError
from rs_engine.runtime_openvino import (  # noqa: F401 (the OpenVINO runtime's names, as before its own module)
    CACHE_ENV,
    OPENVINO_PRECISIONS,
    PRECISION_ENV,
    SCAN_ENV,
    OpenVinoPredictor,
    _compiled,
    _openvino_core,
    _restore_empty_branches,
    openvino_cache_dir,
    openvino_precision,
)

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
#: ONNX graph input and outputs, as ``rs-engine export`` names them.
ONNX_INPUT, ONNX_OUTPUTS = "image", ("boxes", "labels", "scores", "roi_masks")
#: What graphs exported before box-frame masks name their last output: full-tile (K, 1, T, T) masks.
ONNX_OUTPUTS_FULL_MASKS = ("boxes", "labels", "scores", "masks")


def exported_output_names(has_name: Callable[[str], bool]) -> tuple[str, ...] | None:
    """The names of an exported graph's four outputs, given whether the graph has an output of a name: box-frame
    masks (:data:`ONNX_OUTPUTS`) or an older graph's full-tile masks; None where the names were lost (the caller
    takes the outputs by position, in :data:`ONNX_OUTPUTS` order, as ``rs-engine export`` writes them)."""
    return next((names for names in (ONNX_OUTPUTS, ONNX_OUTPUTS_FULL_MASKS) if all(map(has_name, names))), None)


def torch_available() -> bool:
    """True when PyTorch and torchvision are installed (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """True when OpenVINO is installed (``pip install 'delineate[openvino]'``), without importing it."""
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(spec: str | os.PathLike, runtime: str = "auto", device: str = "auto") -> str:
    """``"torch"``, ``"onnx"`` or ``"openvino"`` for a model spec (bundled name or path), the ``--runtime`` choice
    and the ``--device``.

    ``auto``: without PyTorch, OpenVINO where it is installed (its exported scan; no CUDA driver in sight), else
    ONNX Runtime (the light engine); with PyTorch, OpenVINO where it is installed, the model has
    an ``.onnx`` form (a bundled name, or an ``.onnx`` file: never a ``.safetensors`` path, whose ``.onnx``
    sibling may be older than it) and the device is the CPU: on the 2-core Xeon it segments 2.8x faster than
    PyTorch for 0.5 mask AP (bf16; docs/benchmarks.md 2b); else ONNX Runtime for an ``.onnx`` file, PyTorch
    otherwise. :func:`rs_engine.pipeline.segment` goes back to PyTorch where a tile size or score threshold needs
    a graph other than the exported one.

    Raises:
        InputError: an unknown runtime, or a runtime that is not installed (with what to install).
    """
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime}: use one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        onnx_file = str(spec).lower().endswith(".onnx")
        exported = onnx_file or str(spec) in bundled_models(".onnx")
        if openvino_available() and exported and _on_cpu(device):
            runtime = "openvino"
        else:
            runtime = "onnx" if onnx_file or not torch_available() else "torch"
    if runtime == "torch" and not torch_available():
        raise InputError("--runtime torch: PyTorch is not installed (pip install 'delineate[torch]')")
    if runtime == "onnx" and not onnxruntime_available():
        raise InputError("--runtime onnx: ONNX Runtime is not installed (pip install onnxruntime)")
    if runtime == "openvino" and not openvino_available():
        raise InputError("--runtime openvino: OpenVINO is not installed (pip install openvino)")
    return runtime


def _on_cpu(device: str) -> bool:
    """True when ``device`` (``auto``, ``cpu``, ``cuda[:N]``) runs on the CPU: ``auto`` on a machine without CUDA.

    Without an NVIDIA driver in sight (``/proc/driver/nvidia/version``, ``nvidia-smi``, ``nvcuda``) the answer
    is the CPU without importing PyTorch, which would cost an OpenVINO run 1.5 s and 500 MB of RSS. With a driver
    and no PyTorch, not the CPU: ONNX Runtime's CUDA provider may run."""
    if device != "auto":
        return device == "cpu"
    if not _nvidia_driver():
        return True
    if not torch_available():
        return False
    import torch

    return not torch.cuda.is_available()


def _nvidia_driver() -> bool:
    """Whether an NVIDIA driver is in sight (Linux's ``/proc`` entry, ``nvidia-smi``, Windows' ``nvcuda``)."""
    import ctypes.util
    import shutil

    return bool(Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")
                or ctypes.util.find_library("nvcuda"))


def model_file(spec: str | os.PathLike, runtime: str) -> Path:
    """The model file a runtime reads for ``spec``: for a bundled name its ``.safetensors`` (torch) or ``.onnx``
    (onnx, openvino).

    Raises:
        InputError: no such model, or a file of the other runtime's form.
    """
    suffix = ".safetensors" if runtime == "torch" else ".onnx"
    path = resolve_model(spec, suffix)
    if path.suffix.lower() != suffix:
        other = "onnx" if runtime == "torch" else "torch"
        raise InputError(f"{path}: a {path.suffix} model runs with --runtime {other}, not {runtime}"
                         + (" (rs-engine export writes the .onnx form)" if runtime != "torch" else ""))
    return path


def load_predictor(
    spec: str | os.PathLike,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    streams: int = 1,
) -> tuple[TorchPredictor | OnnxPredictor | OpenVinoPredictor, ModelCard]:
    """Load a model for inference in the chosen runtime; returns ``(predictor, card)``.

    Args:
        spec: bundled model name or model file path.
        runtime: ``auto``, ``torch``, ``onnx`` or ``openvino`` (:func:`choose_runtime`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`rs_engine.device.resolve_device`); ONNX Runtime
            uses its CUDA execution provider for a CUDA device when it has one, else the CPU; OpenVINO runs on
            the CPU only.
        threads: intra-op CPU threads per stream; None: ``OMP_NUM_THREADS`` when set, else all cores.
        streams: how many threads of the caller may predict at once (:func:`rs_engine.predict.stream_plan`); OpenVINO
            plans that many execution streams of ``threads`` threads each, the other runtimes need not know.

    Raises:
        InputError: as :func:`choose_runtime` and :func:`model_file`; missing, corrupt or mismatched model files;
            ``--device cuda`` or a bad ``DELINEATE_OPENVINO_PRECISION`` with OpenVINO.
    """
    runtime = choose_runtime(spec, runtime, device)
    path = model_file(spec, runtime)
    if runtime == "torch":
        import torch

        from rs_engine.checkpoint import load_model
        from rs_engine.device import resolve_device
        from rs_engine.models.fuse import fold_batchnorm

        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        model, card = load_model(path, dev)
        fold_batchnorm(model)  # inference only: BatchNorm folded into the convolutions, as ONNX Runtime does
        return TorchPredictor(model), card
    card = read_card(path)
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])  # as PyTorch does; ONNX Runtime and OpenVINO ignore it
    if runtime == "openvino":
        if device.startswith("cuda"):
            raise InputError(f"--device {device}: --runtime openvino runs on the CPU (use --device cpu or auto)")
        return OpenVinoPredictor(path, card, threads=threads, streams=streams), card
    return OnnxPredictor(path, card, cuda=device != "cpu", threads=threads), card


class TorchPredictor:
    """A torchvision Mask R-CNN in eval mode as a predictor (numpy in, numpy out), on the model's device."""

    runtime = "torch"

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        if hasattr(model.transform, "paste"):  # box-frame masks, pasted box by box by the pipeline (maskpaste)
            model.transform.paste = False
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    @property
    def on_gpu(self) -> bool:
        """True on a CUDA device (the pipeline then predicts one batch at a time)."""
        return self.device.type == "cuda"

    def set_score_threshold(self, threshold: float) -> None:
        """Drop low scores inside the box head, before the mask head runs on them."""
        heads = self.model.roi_heads
        heads.score_thresh = max(heads.score_thresh, threshold)

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        import torch

        with torch.inference_mode():
            outputs = self.model([torch.from_numpy(np.ascontiguousarray(i)).to(self.device) for i in images])
        return [{k: v.cpu().numpy() for k, v in out.items()} for out in outputs]


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime_ns: int, cuda: bool, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings of shape inference on the mask loop's dynamic count are noise
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise InputError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None


def onnx_session(path: str | os.PathLike, cuda: bool = False, threads: int | None = None) -> Any:
    """The ONNX Runtime session of a model file, made once per file version, device and thread count.

    Raises:
        InputError: missing or unreadable file, or not a valid ONNX model.
    """
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise InputError(f"{path}: cannot read the model ({exc.strerror})") from None
    return _session(str(path), mtime, cuda, threads)


class OnnxPredictor:
    """An exported model (``rs-engine export``) run by ONNX Runtime, one tile per run (the graph takes one
    (C, T, T) image at the tile size it was exported for)."""

    runtime = "onnx"

    def __init__(self, path: Path, card: ModelCard, cuda: bool = False, threads: int | None = None) -> None:
        self.session = onnx_session(path, cuda, threads)
        shape = self.session.get_inputs()[0].shape
        self.input_shape = tuple(int(s) for s in shape)
        self.tile_size = self.input_shape[-1]
        self.path = path
        outputs = [o.name for o in self.session.get_outputs()]
        names = exported_output_names(outputs.__contains__)
        self._outputs = list(names) if names else outputs  # session.run's output_names: by name, else by position
        self._names = names or ONNX_OUTPUTS

    @property
    def on_gpu(self) -> bool:
        """True when ONNX Runtime runs the graph on its CUDA execution provider."""
        return self.session.get_providers()[0] == "CUDAExecutionProvider"

    def set_score_threshold(self, threshold: float) -> None:
        """Nothing to do: the graph's box-score floor was fixed at export; lower scores are never returned."""

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        outputs = []
        for image in images:
            if tuple(image.shape) != self.input_shape:
                raise InputError(f"{self.path}: takes {self.input_shape[0]} band(s) of {self.tile_size} px tiles "
                                 f"(fixed at export), got {tuple(image.shape)}")
            values = self.session.run(self._outputs, {ONNX_INPUT: np.ascontiguousarray(image, dtype=np.float32)})
            outputs.append(dict(zip(self._names, values)))
        return outputs
