"""The OpenVINO runtime: ``rs-engine segment --runtime openvino`` (``pip install 'delineate[openvino]'``).

The exported ``.onnx`` model (:mod:`rs_engine.export`) compiled by OpenVINO's CPU plugin, at the CPU's fastest
precision (bf16 with AMX or AVX512-BF16). Where PyTorch and the fused C scan kernel are present (the full venv)
and the model's ``.safetensors`` sits beside its ``.onnx`` (every bundled model), the selective scans run in that
kernel instead of the exported standard-operator scan: the model is exported once more with each scan as one
``delineate::SelectiveScan`` node (:func:`rs_engine.ops.scan_export.selective_scan_custom_op`), kept in the
OpenVINO cache folder, and OpenVINO's ONNX reader maps each such node to :class:`SelectiveScanOp`, a Python
``openvino.Op`` whose ``evaluate`` calls the kernel (OpenVINO, "Custom OpenVINO Operations", Python API). The
unrolled scan costs OpenVINO a third of a 512 px ``nwpu10`` tile in elementwise, transpose and slice nodes that
each sweep ``(L, dim, dstate)`` tensors through memory; the kernel keeps the state in registers.
``DELINEATE_OPENVINO_SCAN=graph`` keeps the standard-operator scan (``fused``, the default, falls back to it with
a log line where the kernel or the ``.safetensors`` is missing).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from rs_engine.card import ModelCard, _first_line, read_card
from rs_engine.errors import InputError

log = logging.getLogger(__name__)


#: Environment variable choosing OpenVINO's inference precision; unset: OpenVINO's default for the CPU.
PRECISION_ENV = "DELINEATE_OPENVINO_PRECISION"
#: Environment variable naming the folder where OpenVINO keeps compiled models (``off``: compile on every run);
#: unset: :func:`openvino_cache_dir`'s default.
CACHE_ENV = "DELINEATE_OPENVINO_CACHE"
OPENVINO_PRECISIONS = ("f32", "bf16", "f16", "int8", "float")
#: Environment variable choosing how the selective scans run: ``fused`` (the C kernel, default) or ``graph``.
SCAN_ENV = "DELINEATE_OPENVINO_SCAN"
#: Bumped when the custom-node export changes, so that graphs cached by an older version are not reused.
_SCAN_GRAPH_VERSION = "5"  # 5: the SS2D projections as matmul, not einsum (no transposes around them)


def openvino_precision() -> str | None:
    """The inference precision asked for in ``DELINEATE_OPENVINO_PRECISION``: ``f32``, ``bf16``, ``f16``, ``int8``
    (the model's int8 file, :mod:`rs_engine.runtime_int8`) or ``float`` (OpenVINO's default floating point: bf16
    on CPUs with AVX512-BF16 or AMX, f32 elsewhere); None (unset) for the default: int8 where the model has a valid
    int8 file, else ``float``.

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


def openvino_scan() -> str:
    """``fused`` or ``graph`` from ``DELINEATE_OPENVINO_SCAN`` (unset: ``fused``).

    Raises:
        InputError: any other value.
    """
    value = os.environ.get(SCAN_ENV, "").strip().lower() or "fused"
    if value not in ("fused", "graph"):
        raise InputError(f"{SCAN_ENV}={value}: use fused or graph (or leave it unset)")
    return value


_conversion = threading.local()  # the threads each SelectiveScanOp gets, while read_model converts a graph


def _selective_scan_op_class() -> type:
    """:class:`SelectiveScanOp`, defined on first use so that importing this module never imports OpenVINO."""
    global SelectiveScanOp
    if SelectiveScanOp is not None:
        return SelectiveScanOp
    from openvino import Op

    from rs_engine.ops.scan_kernel import scan_forward_arrays

    class SelectiveScan(Op):
        """``delineate::SelectiveScan(u, delta, A, B, C, D, delta_bias)`` -> (batch, dim, L), float32: Mamba-1's
        selective scan (:func:`rs_engine.ops.selective_scan.selective_scan_fn`'s contract, B and C as (batch,
        groups, dstate, L)) run by the fused C kernel on ``threads`` OpenMP threads. The CPU plugin runs the
        node as a reference (``evaluate``) node in float32, converting around it under bf16 inference."""

        def __init__(self, inputs=None, softplus: bool = True, threads: int | None = None) -> None:  # noqa: ANN001
            super().__init__(self, inputs)
            self.softplus = bool(softplus)  # an IR reader sets the threads of the read_model call
            self.threads = int(threads if threads is not None else getattr(_conversion, "threads", 1))

        def validate_and_infer_types(self) -> None:
            self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

        def clone_with_new_inputs(self, new_inputs):  # noqa: ANN001, ANN201
            return SelectiveScan(new_inputs, self.softplus, self.threads)

        def visit_attributes(self, visitor) -> bool:  # noqa: ANN001
            visitor.on_attributes({"softplus": self.softplus})  # written to (and read back from) an IR
            return True

        def has_evaluate(self) -> bool:
            return True

        def evaluate(self, outputs, inputs) -> bool:  # noqa: ANN001
            u, delta, A, B, C, D, bias = (np.ascontiguousarray(t.data, dtype=np.float32) for t in inputs)
            Bt, Ct = (np.ascontiguousarray(X.transpose(0, 1, 3, 2)) for X in (B, C))  # token-major, as the kernel
            outputs[0].shape = u.shape
            scan_forward_arrays(u, delta, A, Bt, Ct, D, bias, self.softplus, outputs[0].data, self.threads)
            return True

    SelectiveScanOp = SelectiveScan
    return SelectiveScanOp


SelectiveScanOp: type | None = None


@functools.cache
def _helper() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="openvino")


def _off_main_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, in a helper thread when called on the main thread.

    Why: OpenVINO calls back into Python (SelectiveScanOp, the frontend's conversion), and Python runs signal
    handlers on the main thread only. A cancel (SIGTERM -> KeyboardInterrupt, :mod:`rs_engine.cli`) landing in
    such a callback was thrown through OpenVINO's C++: compiling failed with an unrelated error, or an inference
    never returned and the QGIS plugin had to kill the process. Here the interrupt reaches the main thread while
    it waits, and the helper finishes its call (one tile, ~0.15 s) on its own.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    return _helper().submit(fn, *args).result()


@functools.cache
def _register_scan_extension() -> None:
    """Map every ``delineate::SelectiveScan`` node OpenVINO's ONNX reader meets to a :class:`SelectiveScanOp`."""
    from openvino.frontend.onnx import ConversionExtension

    from rs_engine.ops.scan_kernel import CUSTOM_OP_DOMAIN, CUSTOM_OP_TYPE

    op_class = _selective_scan_op_class()

    def convert(node):  # noqa: ANN001, ANN202
        softplus = bool(node.get_attribute("delta_softplus", 1))
        inputs = [node.get_input(i) for i in range(7)]
        return op_class(inputs, softplus, getattr(_conversion, "threads", 1)).outputs()

    _openvino_core().add_extension(ConversionExtension(CUSTOM_OP_TYPE, CUSTOM_OP_DOMAIN, convert))


def fused_scan_graph(onnx_path: Path, card: ModelCard) -> tuple[Path | None, str]:
    """The custom-node graph of ``onnx_path`` (exported from its sibling ``.safetensors`` with the same tile size
    and score floor), from the cache or made now (about 20 s, once); ``(None, why)`` where it cannot be had.

    Kept in ``<openvino cache>/scan-graphs/``, named by a hash of the weights file, tile size, floor and
    :data:`_SCAN_GRAPH_VERSION`; written to a temporary name and renamed, so that concurrent runs never read a
    partial file. Without a cache folder it goes to a temporary folder (``<tmp>/delineate-ov-*/scan-graphs/``),
    which :class:`OpenVinoPredictor` removes once compiled. ``(None, why)`` also where the ``.safetensors``'s card
    is not the ``.onnx``'s (weights retrained after the export).
    """
    import importlib.util

    from rs_engine.ops.scan_kernel import fused_cpu_available, fused_cpu_status

    weights = onnx_path.with_suffix(".safetensors")
    if not weights.is_file():
        return None, f"no {weights.name} beside {onnx_path.name}"
    try:
        same = _same_model(read_card(weights), card)
    except InputError as exc:
        return None, str(exc)
    if not same:  # e.g. retrained after the export: run what the .onnx holds, not newer weights
        return None, f"{weights.name}'s card differs from {onnx_path.name}'s"
    if not fused_cpu_available():
        return None, fused_cpu_status()
    spec = (card.provenance or {}).get("onnx", {})
    tile, floor = spec.get("tile_size", card.tile_size), spec.get("min_score", card.score_threshold)
    name, cache = f"{onnx_path.stem}-{scan_graph_digest(weights, card)}.onnx", openvino_cache_dir()
    if cache and (Path(cache) / "scan-graphs" / name).is_file():
        return Path(cache) / "scan-graphs" / name, "cached"  # PyTorch is not even imported
    if importlib.util.find_spec("torch") is None:
        return None, "PyTorch is not installed (it exports the graph once)"
    from rs_engine.export import export_onnx

    out = Path(cache or tempfile.mkdtemp(prefix="delineate-ov-")) / "scan-graphs" / name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.{os.getpid()}.{threading.get_ident()}.onnx")
        log.info("OpenVINO: exporting %s with the fused scan (once; kept in %s)", weights.name, out.parent)
        export_onnx(weights, tmp, tile_size=tile, min_score=floor, overwrite=True, scan_op=True)
        os.replace(tmp, out)
    except (OSError, InputError) as exc:
        return None, f"cannot export the fused-scan graph ({_first_line(exc)})"
    return out, "exported"


def scan_graph_digest(weights: Path, card: ModelCard) -> str:
    """16 hex digits naming the fused-scan graph of ``weights`` as exported for ``card``'s ``.onnx`` (its tile
    size and score floor) by this version of the export (:data:`_SCAN_GRAPH_VERSION`)."""
    spec = (card.provenance or {}).get("onnx", {})
    tile, floor = spec.get("tile_size", card.tile_size), spec.get("min_score", card.score_threshold)
    digest = hashlib.sha256(Path(weights).read_bytes())
    digest.update(f"{tile} {floor} {_SCAN_GRAPH_VERSION}".encode())
    return digest.hexdigest()[:16]


def openvino_graph(path: Path, card: ModelCard) -> tuple[Path, str, str | None, bool]:
    """What ``--runtime openvino`` compiles for the ``.onnx`` file ``path``, from ``DELINEATE_OPENVINO_PRECISION``
    and ``DELINEATE_OPENVINO_SCAN``: ``(graph, scan, precision hint or None, int8)``. The int8 IR where asked
    for or by default where valid (:mod:`rs_engine.runtime_int8`), else the fused-scan graph, else ``path``.

    Raises:
        InputError: ``int8`` asked for and no valid int8 file; a bad setting.
    """
    from rs_engine.runtime_int8 import int8_graph

    precision, scan = openvino_precision(), openvino_scan()
    int8, why = None, f"{SCAN_ENV}=graph"
    if precision in (None, "int8") and scan == "fused":
        int8, why = int8_graph(path, card)
    if int8 is None and precision == "int8":
        raise InputError(f"{path}: no int8 model to run ({why})")
    if int8 is None and precision is None:
        log.info("OpenVINO: no int8 model: %s", why)
    hint = None if precision in ("int8", "float") else precision  # OpenVINO's default floating point
    if int8 is not None:
        return int8, scan, hint, True
    if scan == "fused":
        graph, why = fused_scan_graph(path, card)
        if graph is not None:
            return graph, scan, hint, False
        log.info("OpenVINO: the selective scans run as exported operators: %s", why)
    return path, "graph", hint, False


def _same_model(a: ModelCard, b: ModelCard) -> bool:
    """Whether two cards describe the same trained model, whatever tile size an export fixed."""
    def core(c: ModelCard) -> dict:
        d = dict(c.__dict__)
        d["provenance"] = {k: v for k, v in (d.get("provenance") or {}).items() if k != "onnx"}
        d.pop("tile_size", None)
        return d

    return core(a) == core(b)


@functools.lru_cache(maxsize=4)
def _compiled(path: str, mtime_ns: int, threads: int | None, streams: int, precision: str | None,
              fused_scan: bool = False) -> Any:
    # LATENCY: one execution stream per caller stream, all its threads on one tile (the pipeline's own streams
    # give the concurrency); without it OpenVINO's CPU default is throughput with several streams.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": streams}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads * streams
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    # A compiled blob holding the Python operation loads back (same outputs; tests/test_int8.py) for the int8 IR;
    # the ONNX fused-scan graph compiles every time.
    if (not fused_scan or path.endswith(".xml")) and (cache := openvino_cache_dir()):
        config["CACHE_DIR"] = cache
    try:
        model = _off_main_thread(read_model, path, fused_scan, threads or max(1, (os.cpu_count() or 1) // streams))
        return _off_main_thread(_openvino_core().compile_model, model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError (or its own classes) for any unreadable graph
        raise InputError(f"{path}: OpenVINO cannot run this model ({_first_line(exc)})") from None


def read_model(path: str | os.PathLike, fused_scan: bool = False, scan_threads: int = 1) -> Any:
    """OpenVINO's model of an exported ``.onnx`` file (or of an int8 IR), as the runtime compiles it: empty NMS
    branches restored
    (:func:`_restore_empty_branches`); with ``fused_scan``, each ``delineate::SelectiveScan`` node becomes a
    :class:`SelectiveScanOp` on ``scan_threads`` threads. Raises what OpenVINO's reader raises."""
    if str(path).endswith(".xml"):  # an int8 IR (rs-train quantize)
        from rs_engine.runtime_int8 import read_int8

        return read_int8(path, scan_threads)
    if fused_scan:
        _register_scan_extension()
        _conversion.threads = scan_threads
    model = _openvino_core().read_model(str(path))
    _restore_empty_branches(model)
    return model


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
        precision: ``int8`` where the model's int8 file runs (:mod:`rs_engine.runtime_int8`, the default where
            there is one), else the precision OpenVINO compiled for (``f32``, ``bf16`` or ``f16``): its default
            unless ``DELINEATE_OPENVINO_PRECISION`` says otherwise. bf16 (CPUs with AVX512-BF16 or AMX) was 2.6x
            faster than ONNX Runtime on a 512 px nwpu10 tile, one thread; f32 matched ONNX Runtime's outputs to
            5e-5 (OpenVINO, https://docs.openvino.ai, "Precision Control").
        input_shape, tile_size: the (C, T, T) tile the graph takes, fixed at export.
        scan: ``fused`` (the selective scans in the fused C kernel, :class:`SelectiveScanOp`) or ``graph`` (the
            exported standard-operator scan).
    """

    runtime = "openvino"

    def __init__(self, path: Path, card: ModelCard, threads: int | None = None, streams: int = 1) -> None:
        from rs_engine.runtime import ONNX_OUTPUTS, exported_output_names  # here: runtime imports this module

        path = Path(path)
        try:
            path.stat()
        except OSError as exc:
            raise InputError(f"{path}: cannot read the model ({exc.strerror})") from None
        graph, self.scan, precision, int8 = openvino_graph(path, card)
        self.compiled = _compiled(str(graph), graph.stat().st_mtime_ns, threads, max(1, streams), precision,
                                  self.scan == "fused")
        if not int8 and graph != path and openvino_cache_dir() is None:  # a temporary export: compiled
            shutil.rmtree(graph.parent.parent, ignore_errors=True)
        self.precision = "int8" if int8 else self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.input_shape = tuple(int(d) for d in self.compiled.input(0).get_shape())
        self.tile_size = self.input_shape[-1]
        self.path = path
        outputs = self.compiled.outputs
        names = exported_output_names(lambda n: any(n in o.get_names() for o in outputs))
        self._names = names or ONNX_OUTPUTS
        self._outputs = [self.compiled.output(n) for n in names] if names else list(outputs)  # else by position
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
                result = _off_main_thread(request.infer, {0: np.ascontiguousarray(image, dtype=np.float32)})
                outputs.append({name: result[port] for name, port in zip(self._names, self._outputs)})
        finally:
            self._requests.put(request)
        return outputs
