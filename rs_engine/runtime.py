"""Runtimes: what runs the network on the tiles. PyTorch (``.safetensors`` models), ONNX Runtime or OpenVINO
(both on the ``.onnx`` form).

A predictor is ``predictor(list of (C, T, T) float32 normalised arrays) -> list of dicts`` with ``boxes`` (K, 4)
x1y1x2y2 tile pixels, ``labels`` (K,) 1..num_classes, ``scores`` (K,) 0-1 and ``masks`` (K, 1, T, T)
probabilities, as numpy arrays: torchvision Mask R-CNN's eval-mode convention, whichever runtime computes it.
The pipeline (:mod:`rs_engine.pipeline`) sees only that, so tiling, merging and writing are one code path.

``--runtime auto`` takes ONNX Runtime when PyTorch is not installed (the light engine, ``pip install delineate``)
or the model is an ``.onnx`` file, and PyTorch otherwise; OpenVINO (an extra) runs only when asked for.
Nothing here imports PyTorch or OpenVINO unless it runs them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import queue
from pathlib import Path
from typing import Any

import numpy as np

from rs_engine.card import ModelCard, _first_line, read_card, resolve_model
from rs_engine.errors import InputError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx", "openvino")
#: ONNX graph input and outputs, as ``rs-engine export`` names them.
ONNX_INPUT, ONNX_OUTPUTS = "image", ("boxes", "labels", "scores", "masks")


def torch_available() -> bool:
    """True when PyTorch and torchvision are installed (without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """True when OpenVINO is installed (``pip install 'delineate[openvino]'``), without importing it."""
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(spec: str | os.PathLike, runtime: str = "auto") -> str:
    """``"torch"``, ``"onnx"`` or ``"openvino"`` for a model spec (bundled name or path) and the ``--runtime``
    choice; ``auto`` never picks OpenVINO.

    Raises:
        InputError: an unknown runtime, or a runtime that is not installed (with what to install).
    """
    if runtime not in RUNTIMES:
        raise InputError(f"--runtime {runtime}: use one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        onnx_file = str(spec).lower().endswith(".onnx")
        runtime = "onnx" if onnx_file or not torch_available() else "torch"
    if runtime == "torch" and not torch_available():
        raise InputError("--runtime torch: PyTorch is not installed (pip install 'delineate[torch]')")
    if runtime == "onnx" and not onnxruntime_available():
        raise InputError("--runtime onnx: ONNX Runtime is not installed (pip install onnxruntime)")
    if runtime == "openvino" and not openvino_available():
        raise InputError("--runtime openvino: OpenVINO is not installed (pip install openvino)")
    return runtime


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
    runtime = choose_runtime(spec, runtime)
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
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    @property
    def on_gpu(self) -> bool:
        """True on a CUDA device (the pipeline then predicts one batch at a time)."""
        return self.device.type == "cuda"

    def set_score_threshold(self, threshold: float) -> None:
        """Drop low scores inside the box head, before a full-tile mask is pasted for each detection."""
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
            values = self.session.run(None, {ONNX_INPUT: np.ascontiguousarray(image, dtype=np.float32)})
            outputs.append(dict(zip(ONNX_OUTPUTS, values)))
        return outputs


# ------------------------------------------------------------------------------------------------ OpenVINO

#: Environment variable choosing OpenVINO's inference precision; unset: OpenVINO's default for the CPU.
PRECISION_ENV = "DELINEATE_OPENVINO_PRECISION"
#: Environment variable naming the folder where OpenVINO keeps compiled models (``off``: compile on every run);
#: unset: :func:`openvino_cache_dir`'s default.
CACHE_ENV = "DELINEATE_OPENVINO_CACHE"
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")


def openvino_precision() -> str | None:
    """The inference precision asked for in ``DELINEATE_OPENVINO_PRECISION`` (``f32``, ``bf16`` or ``f16``), or
    None for OpenVINO's default (bf16 on CPUs with AVX512-BF16 or AMX, f32 elsewhere: the fastest it has).

    Raises:
        InputError: any other value.
    """
    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if value and value not in OPENVINO_PRECISIONS:
        raise InputError(f"{PRECISION_ENV}={value}: use one of {', '.join(OPENVINO_PRECISIONS)} (or leave it unset)")
    return value or None


def openvino_cache_dir() -> str | None:
    """Where OpenVINO keeps compiled models: ``DELINEATE_OPENVINO_CACHE``, else ``$XDG_CACHE_HOME/delineate/openvino``
    (``~/.cache/delineate/openvino``), as the fused scan kernel is cached; None (compile every run) for ``off``,
    ``0`` or ``none``, or where the folder cannot be made. Compiling ``nwpu10`` takes about 4.6 s, loading it back
    2.3 s (one thread, the 2-core Xeon); each model, precision and thread setting keeps its own entry (about 40 MB).
    """
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none"):
        return None
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(value) if value else user_cache / "delineate" / "openvino"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home: slower starts, same results
        log.debug("OpenVINO model cache off: %s: %s", root, exc.strerror)
        return None
    return str(root)


@functools.cache
def _openvino_core() -> Any:
    import openvino as ov

    return ov.Core()


@functools.lru_cache(maxsize=4)
def _compiled(path: str, mtime_ns: int, threads: int | None, streams: int, precision: str | None) -> Any:
    # LATENCY: one execution stream per caller stream, all its threads on one tile (the pipeline's own streams
    # give the concurrency); without it OpenVINO's CPU default is throughput with several streams.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": streams}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads * streams
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if cache := openvino_cache_dir():
        config["CACHE_DIR"] = cache
    core = _openvino_core()
    try:
        model = core.read_model(path)
        _restore_empty_branches(model)
        return core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError (or its own classes) for any unreadable graph
        raise InputError(f"{path}: OpenVINO cannot run this model ({_first_line(exc)})") from None


def _restore_empty_branches(model: Any) -> int:
    """Give back their empty tensor to the ``If`` branches that return an empty constant; returns how many.

    Why: OpenVINO's ONNX reader turns a zero-element constant into a scalar it marks ``ONNX_FAILSAFE_NODE``
    (OpenVINO 2026.4; see openvinotoolkit/openvino#37706 for the same in Expand). torchvision's ``batched_nms``
    exports as ``If(no boxes) then Constant(int64, shape (0,)) else keep``, so a tile without one box above the
    score floor came back with one detection of stale memory (the previous tile's first score) instead of none.
    An empty constant of the If output's rank (first axis 0) restores the ONNX semantics.
    """
    import openvino as ov

    fixed = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("If", "Loop", "TensorIterator"):
            continue
        for branch in range(2 if kind == "If" else 1):
            body = op.get_function(branch)
            fixed += _restore_empty_branches(body)
            if kind != "If":
                continue
            feeds = {d.body_value_index: d.output_index for d in op.get_output_descriptions(branch)}
            for k, result in enumerate(body.get_results()):
                src = result.input_value(0).get_node()
                rank = op.get_output_partial_shape(feeds[k]).rank if k in feeds else None
                if (src.get_type_name() != "Constant" or "ONNX_FAILSAFE_NODE" not in src.get_rt_info()
                        or rank is None or not rank.is_static or rank.get_length() < 1):
                    continue
                empty = np.zeros((0,) * rank.get_length(), dtype=src.get_element_type().to_dtype())
                result.input(0).replace_source_output(ov.op.Constant(empty).output(0))
                fixed += 1
            body.validate_nodes_and_infer_types()
    if fixed:
        model.validate_nodes_and_infer_types()
    return fixed


class OpenVinoPredictor:
    """An exported model (``rs-engine export``, the same ``.onnx`` file ONNX Runtime runs) compiled by OpenVINO for
    the CPU, one (C, T, T) tile per inference.

    Attributes:
        precision: the inference precision OpenVINO compiled for (``f32``, ``bf16`` or ``f16``): its default
            unless ``DELINEATE_OPENVINO_PRECISION`` says otherwise. bf16 (CPUs with AVX512-BF16 or AMX) was 2.6x
            faster than ONNX Runtime on a 512 px nwpu10 tile, one thread; f32 matched ONNX Runtime's outputs to
            5e-5 (OpenVINO, https://docs.openvino.ai, "Precision Control").
        input_shape, tile_size: the (C, T, T) tile the graph takes, fixed at export.
    """

    runtime = "openvino"

    def __init__(self, path: Path, card: ModelCard, threads: int | None = None, streams: int = 1) -> None:
        path = Path(path)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError as exc:
            raise InputError(f"{path}: cannot read the model ({exc.strerror})") from None
        self.compiled = _compiled(str(path), mtime, threads, max(1, streams), openvino_precision())
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.input_shape = tuple(int(d) for d in self.compiled.input(0).get_shape())
        self.tile_size = self.input_shape[-1]
        self.path = path
        outputs = self.compiled.outputs
        # By tensor name, as rs-engine export names them; by position for a graph whose names were lost.
        named = all(any(n in o.get_names() for o in outputs) for n in ONNX_OUTPUTS)
        self._outputs = [self.compiled.output(n) for n in ONNX_OUTPUTS] if named else list(outputs)
        # An infer request runs one inference at a time: one per caller stream, each reused for every tile.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, streams)):
            self._requests.put(self.compiled.create_infer_request())

    @property
    def on_gpu(self) -> bool:
        """Always False: the CPU plugin only."""
        return False

    def set_score_threshold(self, threshold: float) -> None:
        """Nothing to do: the graph's box-score floor was fixed at export; lower scores are never returned."""

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        outputs = []
        request = self._requests.get()  # blocks while every request is busy in another stream
        try:
            for image in images:
                if tuple(image.shape) != self.input_shape:
                    raise InputError(f"{self.path}: takes {self.input_shape[0]} band(s) of {self.tile_size} px "
                                     f"tiles (fixed at export), got {tuple(image.shape)}")
                # The request's output tensors are overwritten by its next inference: infer() returns copies.
                result = request.infer({0: np.ascontiguousarray(image, dtype=np.float32)})
                outputs.append({name: result[port] for name, port in zip(ONNX_OUTPUTS, self._outputs)})
        finally:
            self._requests.put(request)
        return outputs
