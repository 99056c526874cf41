"""``rs-engine``: the engine's command line. Argument parsing, progress output and exit codes; no logic of its own.

Exit codes (DESIGN.md): 0 done; 2 bad input or usage (one line on stderr, no traceback); 1 internal error;
130 cancelled (Ctrl-C or SIGTERM). With ``--progress jsonl`` every event is also one JSON object per line on
stdout: ``{"event": "progress", "done": k, "total": n}``, then ``{"event": "done", "output": ..., "features": n,
"runtime": ...}`` (and ``"precision"`` and ``"scan"`` where the runtime reports them: OpenVINO),
``{"event": "error", "message": ...}`` or ``{"event": "cancelled"}`` (as ``rs-train`` reports it); with
``--scheduler`` first ``{"event": "cluster", "scheduler": ..., "threads": n, "dashboard": URL or null}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import sys
from collections.abc import Sequence
from typing import Any

from rs_engine import __version__
from rs_engine.errors import InputError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


class UsageParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line + exit 2 (and a JSON error event in jsonl mode)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"usage: {message}")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} needs {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} comma-separated numbers, got {text!r}")
    return values


def _extent(text: str) -> tuple[float, ...]:
    # Parsing only; segment() checks the values (rs_engine.raster.check_extent), the same check for every caller.
    return _floats(text, 4, "--extent MINX,MINY,MAXX,MAXY")


def parse_bands(text: str) -> list[int]:
    """``--bands 1,2,3`` -> [1, 2, 3] (1-based, repeats allowed); argparse type, shared with rs-train."""
    try:
        bands = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bands needs comma-separated band numbers, got {text!r}") from None
    if not bands or min(bands) < 1:
        raise argparse.ArgumentTypeError(f"--bands {text}: band numbers start at 1")
    return bands


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="rs-engine", description="Delineate engine: find and outline objects in rasters.")
    p.add_argument("--version", action="version", version=f"rs-engine {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=UsageParser)

    s = sub.add_parser("segment", help="segment rasters into a GeoPackage of instance polygons")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="raster files GDAL can read (VRT mosaics too), folders of rasters or glob patterns")
    s.add_argument("-o", "--output", required=True, metavar="OUT.gpkg", help="output GeoPackage")
    s.add_argument("--model", default="nwpu10",
                   help="bundled model name, or a .safetensors or .onnx model file (default: nwpu10)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                   help="PyTorch, ONNX Runtime or OpenVINO (CPU; precision: DELINEATE_OPENVINO_PRECISION="
                   "f32|bf16|f16|int8|float, default the model's int8 file where it has one, else OpenVINO's fastest "
                   "float) (default auto: openvino where installed, for bundled models and .onnx "
                   "files on the CPU; else onnx for .onnx files or without PyTorch; else torch)")
    s.add_argument("--threads", type=int, metavar="N", help="CPU threads of the runtime, all streams together "
                   "(default: OMP_NUM_THREADS, else all cores)")
    s.add_argument("--streams", type=int, metavar="N", help="batches predicted at once on the CPU, each on "
                   "threads/N runtime threads (default: one per thread, at most 4)")
    s.add_argument("--tile-size", type=int, metavar="PX", help="tile side in pixels (default: model card)")
    s.add_argument("--overlap", type=int, metavar="PX", help="tile overlap in pixels (default: model card)")
    s.add_argument("--score-threshold", type=float, metavar="F", help="minimum score 0-1 (default: model card)")
    s.add_argument("--bands", type=parse_bands, metavar="1,2,3", help="raster bands to use, 1-based")
    s.add_argument("--extent", type=_extent, metavar="MINX,MINY,MAXX,MAXY", help="in the raster's CRS")
    s.add_argument("--batch-size", type=int, default=4, metavar="N", help="tiles per forward pass")
    s.add_argument("--no-resample", action="store_true", help="don't resample to the model's GSD")
    s.add_argument("--simplify", type=float, default=0.0, metavar="M", help="simplify polygons (map units)")
    s.add_argument("--crs", metavar="CRS", help="output CRS, e.g. EPSG:32616 (default: the first input's)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT.gpkg if it exists")
    s.add_argument("--progress", default="bar", choices=["bar", "jsonl", "none"])
    s.add_argument("--scheduler", metavar="local:N|tcp://HOST:PORT",
                   help="predict on a Dask cluster: N local worker processes, or a running scheduler")
    s.add_argument("--block-tiles", type=int, default=64, metavar="N",
                   help="tiles per cluster task (default 64; a scene with fewer is one task)")

    o = sub.add_parser("outline", help="outline one object per prompt (points, boxes) into a GeoPackage")
    o.add_argument("input", metavar="INPUT", help="raster file GDAL can read")
    o.add_argument("-o", "--output", required=True, metavar="OUT.gpkg", help="output GeoPackage (layer outlines)")
    o.add_argument("--prompts", required=True, metavar="PROMPTS",
                   help="vector file of points (one object each) and/or polygons (their boxes), any CRS")
    o.add_argument("--model", default="nwpu10", help="bundled model name or .safetensors file (default: nwpu10)")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    o.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: OMP_NUM_THREADS, else all)")
    o.add_argument("--bands", type=parse_bands, metavar="1,2,3", help="raster bands to use, 1-based")
    o.add_argument("--no-resample", action="store_true", help="don't resample to the model's GSD")
    o.add_argument("--simplify", type=float, default=0.0, metavar="M", help="simplify polygons (map units)")
    o.add_argument("--overwrite", action="store_true", help="replace OUT.gpkg if it exists")

    v = sub.add_parser("serve", help="interactive outlining: JSON lines on stdin/stdout (rs_engine.serve)")
    v.add_argument("--model", default="nwpu10", help="bundled model name or .safetensors file (default: nwpu10)")
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    v.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: OMP_NUM_THREADS, else all)")

    m = sub.add_parser("models", help="list bundled models and their cards")
    m.add_argument("--json", action="store_true", help="print the model cards as JSON")
    m.add_argument("paths", nargs="*", metavar="MODEL", help="also describe these model files")

    d = sub.add_parser("doctor", help="versions, runtimes, device, CUDA and mamba-ssm status")
    d.add_argument("--json", action="store_true")

    e = sub.add_parser("export", help="write a model as ONNX, for ONNX Runtime (needs PyTorch and onnx)")
    e.add_argument("model", metavar="MODEL", help="bundled model name or .safetensors model file")
    e.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    e.add_argument("--tile-size", type=int, metavar="PX", help="tile side the graph takes (default: model card)")
    e.add_argument("--min-score", type=float, metavar="F",
                   help="box-score floor inside the graph (default: the card's score threshold)")
    e.add_argument("--fp32", action="store_true", help="store float32 weights (default: float16, computed in fp32)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that even a usage error is reported as a JSON event to the plugin.
    jsonl = "--progress=jsonl" in argv or any(
        a == "--progress" and b == "jsonl" for a, b in zip(argv, argv[1:])
    )
    emit = _Emitter(jsonl)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from rs_engine.predict import limit_malloc_arenas

    limit_malloc_arenas()  # first, before any library starts its threads
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("pyogrio").setLevel(logging.WARNING)  # one INFO line per written batch otherwise
        if args.command == "segment":
            return _segment(args, emit)
        if args.command == "outline":
            return _outline(args)
        if args.command == "serve":
            from rs_engine.serve import serve

            emit.jsonl = True  # a model that fails to load is reported as an error event too
            return serve(args.model, args.device, args.threads)
        if args.command == "models":
            return _models(args)
        if args.command == "export":
            return _export(args)
        return _doctor(args)
    except InputError as exc:
        emit.error(str(exc))
        return EXIT_INPUT
    except KeyboardInterrupt:
        emit.cancelled()
        return EXIT_CANCELLED
    except Exception as exc:
        import traceback

        traceback.print_exc()
        emit.error(f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])
        return EXIT_INTERNAL


def _raise_interrupt(signum: int, frame: object) -> None:
    # SIGTERM (the QGIS plugin's cancel) unwinds like Ctrl-C, so temporary outputs are cleaned up.
    raise KeyboardInterrupt


class _Emitter:
    """Writes progress and errors as JSON lines (stdout) or human text (stderr)."""

    def __init__(self, jsonl: bool) -> None:
        self.jsonl = jsonl

    def event(self, **fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    def cancelled(self) -> None:
        """The one cancel report of both CLIs: a ``cancelled`` event (jsonl), a plain line on stderr."""
        if self.jsonl:
            self.event(event="cancelled")
        print("rs-engine: cancelled", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        message = " ".join(message.split())  # always one line
        if self.jsonl:
            self.event(event="error", message=message)
        print(f"rs-engine: error: {message}", file=sys.stderr, flush=True)


def _segment(args: argparse.Namespace, emit: _Emitter) -> int:
    from rs_engine.pipeline import Cancelled, SegmentOptions, segment

    opts = SegmentOptions(
        model=args.model,
        device=args.device,
        runtime=args.runtime,
        threads=args.threads,
        streams=args.streams,
        tile_size=args.tile_size,
        overlap=args.overlap,
        score_threshold=args.score_threshold,
        bands=args.bands,
        extent=args.extent,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        resample=not args.no_resample,
        simplify=args.simplify,
        crs=args.crs,
        scheduler=args.scheduler,
        block_tiles=args.block_tiles,
    )
    bar = None

    def on_cluster(dashboard: str | None, threads: int) -> None:
        if args.progress == "jsonl":
            emit.event(event="cluster", scheduler=args.scheduler, threads=threads, dashboard=dashboard)
        where = f", dashboard {dashboard}" if dashboard else ""
        print(f"rs-engine: Dask cluster {args.scheduler}: {threads} worker thread(s){where}", file=sys.stderr,
              flush=True)  # fmt: skip

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.progress == "jsonl":
            emit.event(event="progress", done=done, total=total)
        elif args.progress == "bar":
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="tile", desc="segment", file=sys.stderr)
            bar.update(done - bar.n)

    try:
        result = segment(args.inputs, args.output, opts, progress=progress, on_cluster=on_cluster)
    except Cancelled:
        emit.cancelled()
        return EXIT_CANCELLED
    finally:
        if bar is not None:
            bar.close()
    if args.progress == "jsonl":
        extra = {k: v for k, v in (("precision", result.precision), ("scan", result.scan)) if v}
        emit.event(event="done", output=str(result.output), features=result.features, runtime=result.runtime, **extra)
    else:
        ran = ", ".join(v for v in (result.runtime, result.precision, result.scan and f"{result.scan} scan") if v)
        print(f"{result.output}: {result.features} instances from {result.tiles} tiles in {result.seconds:.1f} s"
              + (f" ({ran})" if ran else ""))
    return EXIT_OK


def _outline(args: argparse.Namespace) -> int:
    from rs_engine.outlining import OutlineOptions, outline

    opts = OutlineOptions(model=args.model, device=args.device, threads=args.threads, bands=args.bands,
                          resample=not args.no_resample, simplify=args.simplify, overwrite=args.overwrite)
    if not (opts.simplify >= 0 and opts.simplify < float("inf")):
        raise InputError(f"--simplify {opts.simplify}: must be 0 or a positive distance in map units")
    out, prompts, found, seconds = outline(args.input, args.output, args.prompts, opts)
    print(f"{out}: {found} of {prompts} prompts outlined in {seconds:.1f} s")
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from rs_engine.card import bundled_models, read_card

    entries = [(name, str(path)) for name, path in bundled_models().items()] + [(p, p) for p in args.paths]
    cards = [(name, path, read_card(path)) for name, path in entries]
    if args.json:
        print(json.dumps([{"name": n, "path": p, "card": json.loads(c.to_json())} for n, p, c in cards], indent=1))
        return EXIT_OK
    if not cards:
        print("no bundled models installed")
    for name, path, c in cards:
        gsd = f"{c.gsd:g} m" if c.gsd else "any"
        print(f"{name}: {c.label}, {c.bands} band(s), GSD {gsd}, tile {c.tile_size} px, "
              f"classes: {', '.join(c.class_names)}\n  {path}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from rs_engine.runtime import torch_available

    if not torch_available():
        raise InputError("export needs PyTorch: pip install 'delineate[torch]'")
    from rs_engine.export import export_onnx

    out = export_onnx(args.model, args.output, args.tile_size, args.min_score, not args.fp32, args.overwrite)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    import os

    import numpy
    import rasterio

    from rs_engine.card import bundled_models
    from rs_engine.runtime import onnxruntime_available, openvino_available, torch_available

    facts: dict[str, Any] = {
        "rs_engine": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "cpu_cores": os.cpu_count(),
        "runtimes": [],
        "onnxruntime": None,
        "onnxruntime_providers": [],
        "openvino": None,
        "torch": None,
        "torchvision": None,
        "cuda_available": False,
        "cuda_device": None,
        "mamba_ssm": None,
        "cpu_scan": None,
        "device_auto": "cpu",
        "bundled_models": sorted(bundled_models()),
        "bundled_onnx": sorted(bundled_models(".onnx")),
    }
    if onnxruntime_available():
        import onnxruntime

        facts.update(onnxruntime=onnxruntime.__version__, onnxruntime_providers=onnxruntime.get_available_providers())
        facts["runtimes"].append("onnx")
    if openvino_available():
        from importlib.metadata import version

        facts["openvino"] = version("openvino")  # without importing it (a second or so)
        facts["runtimes"].append("openvino")
    if torch_available():
        import torch
        import torchvision

        from rs_engine.ops import fused_cpu_status, mamba_ssm_status

        cuda = torch.cuda.is_available()
        facts.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda_available=cuda,
                     cuda_device=torch.cuda.get_device_name(0) if cuda else None, mamba_ssm=mamba_ssm_status(),
                     cpu_scan=fused_cpu_status(), device_auto="cuda" if cuda else "cpu")  # fmt: skip
        facts["runtimes"].insert(0, "torch")
    if args.json:
        print(json.dumps(facts, indent=1))
    else:
        for key, value in facts.items():
            print(f"{key:22s} {value}")
    return EXIT_OK


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
