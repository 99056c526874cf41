"""Where one tile's time goes: torch.profiler over the whole Mask R-CNN forward of a model on a real 512 px tile.

Usage::

    .venv/bin/python bench/profile_tile.py [--model nwpu10] [--threads 1] [--out bench/results]
        [--runtime torch|onnx|openvino]

The network is the one ``rs-engine segment --runtime torch`` runs (BatchNorm folded, the selective scan's
backend as dispatched; ``DELINEATE_SCAN=chunked`` profiles the chunked PyTorch scan). Reads the first 512 x 512
window of an NWPU VHR-10 mosaic (:func:`bench.common.nwpu_mosaic`), normalises it with the model card, keeps
detections over the card's score threshold as ``rs-engine segment`` does, runs one warm-up forward pass, then
profiles three. Writes ``profile_<model>.txt``: time by
stage (backbone body, FPN, RPN, RoI heads) from ``record_function`` ranges, and the top operators by self CPU time.
``--runtime onnx`` profiles the bundled ``.onnx`` form with ONNX Runtime's profiler instead (time by operator type,
``profile_<model>_onnx.txt``); ``--runtime openvino`` with OpenVINO's per-node performance counters (time by
operator type and by the kernel it chose, which names the precision: ``profile_<model>_openvino_<scan>.txt``,
``..._int8.txt`` for the model's int8 file; precision and scan as ``rs-engine segment`` runs them,
``DELINEATE_OPENVINO_PRECISION`` and ``DELINEATE_OPENVINO_SCAN=fused|graph`` to change them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, nwpu_mosaic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nwpu10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--data", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--runtime", default="torch", choices=["torch", "onnx", "openvino"])
    ap.add_argument("--float-precision", choices=["f32", "bf16"],
                    help="openvino: the precision of what the int8 file leaves in floating point (default OpenVINO's; "
                         "f32 where oneDNN is capped to AVX2 on a CPU with bf16, whose bf16 kernels are then missing)")
    args = ap.parse_args()
    if args.runtime == "onnx":
        return _profile_onnx(args)
    if args.runtime == "openvino":
        return _profile_openvino(args)
    import numpy as np
    import rasterio
    import torch
    from rasterio.windows import Window
    from torch.profiler import ProfilerActivity, profile, record_function

    from rs_engine.runtime import load_predictor

    torch.set_num_threads(args.threads)
    predictor, card = load_predictor(args.model, runtime="torch", device="cpu")  # the network rs-engine runs
    model = predictor.model
    model.roi_heads.score_thresh = max(model.roi_heads.score_thresh, card.score_threshold)  # as rs-engine segment
    with rasterio.open(nwpu_mosaic(args.data / "nwpu_mosaic_1024.tif", 1024)) as ds:
        a = ds.read(list(range(1, card.bands + 1)), window=Window(0, 0, 512, 512)).astype(np.float32)
    x = (torch.from_numpy(a) - torch.tensor(card.mean)[:, None, None]) / torch.tensor(card.std)[:, None, None]

    stages = {"backbone body": model.backbone.body, "FPN": model.backbone.fpn, "RPN": model.rpn,
              "RoI heads (box + mask)": model.roi_heads}
    for name, mod in stages.items():
        def pre(m, inp, name=name):  # noqa: ANN001, ANN202
            m._rf = record_function(name)
            m._rf.__enter__()

        def post(m, inp, out):  # noqa: ANN001, ANN202
            m._rf.__exit__(None, None, None)

        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)
    with torch.inference_mode():
        model([x])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                with record_function("whole forward"):
                    out = model([x])
    events = prof.key_averages()
    total = next(e for e in events if e.key == "whole forward").cpu_time_total
    lines = [f"model {args.model} ({card.architecture.get('backbone')}), 512 px tile, {args.threads} threads, "
             f"{len(out[0]['scores'])} detections; mean of 3 forward passes", "", "| stage | ms per tile | share |",
             "|---|---|---|"]
    for name in [*stages, "whole forward"]:
        e = next((e for e in events if e.key == name), None)
        if e is not None:
            lines.append(f"| {name} | {e.cpu_time_total / 3 / 1e3:.0f} | {100 * e.cpu_time_total / total:.0f}% |")
    lines += ["", "Top operators by self CPU time:", "```",
              events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40), "```"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{Path(args.model).stem}.txt").write_text(text + "\n")
    print(text)


def _profile_onnx(args: argparse.Namespace) -> None:
    """ONNX Runtime's own profiler over three runs of the exported graph on the same tile: time by operator type."""
    import collections
    import json

    import numpy as np
    import onnxruntime as ort
    import rasterio
    from rasterio.windows import Window

    from rs_engine.card import read_card
    from rs_engine.runtime import ONNX_INPUT, model_file

    path = model_file(args.model, "onnx")
    card = read_card(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling, opts.log_severity_level = args.threads, True, 3
    opts.profile_file_prefix = str(args.data / "ort_profile")
    args.data.mkdir(parents=True, exist_ok=True)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    with rasterio.open(nwpu_mosaic(args.data / "nwpu_mosaic_1024.tif", 1024)) as ds:
        a = ds.read(list(range(1, card.bands + 1)), window=Window(0, 0, 512, 512)).astype(np.float32)
    x = (a - np.float32(card.mean)[:, None, None]) / np.float32(card.std)[:, None, None]
    session.run(None, {ONNX_INPUT: x})  # warm-up, also profiled: dropped below by counting runs
    for _ in range(3):
        out = session.run(None, {ONNX_INPUT: x})
    trace = Path(session.end_profiling())
    by_op, runs = collections.Counter(), 0
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name")] += e["dur"]
    trace.unlink()
    total = sum(by_op.values())
    lines = [f"model {args.model} (ONNX Runtime {ort.__version__}), 512 px tile, {args.threads} threads, "
             f"{len(out[2])} detections; kernel time summed over {runs} runs (warm-up included)", "",
             "| operator | ms per run | share |", "|---|---|---|"]
    lines += [f"| {op} | {d / runs / 1e3:.0f} | {100 * d / total:.1f}% |" for op, d in by_op.most_common(15)]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{Path(args.model).stem}_onnx.txt").write_text(text + "\n")
    print(text)


def _profile_openvino(args: argparse.Namespace) -> None:
    """OpenVINO's performance counters over three inferences on the same tile (after a warm-up): time by operator
    type and by kernel (its name carries the precision, e.g. ``brgconv_avx512_amx_bf16``)."""
    import collections

    import numpy as np
    import openvino as ov
    import rasterio
    from rasterio.windows import Window

    from rs_engine.card import read_card
    from rs_engine.runtime import model_file
    from rs_engine.runtime_openvino import _openvino_core, openvino_graph, read_model

    path = model_file(args.model, "openvino")
    card = read_card(path)
    graph, scan, hint, int8 = openvino_graph(path, card)  # what rs-engine segment --runtime openvino runs
    core = _openvino_core()
    model = read_model(graph, scan == "fused", args.threads)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads, "PERF_COUNT": True}
    if hint or args.float_precision:
        config["INFERENCE_PRECISION_HINT"] = args.float_precision or hint
    compiled = core.compile_model(model, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if int8:
        precision = f"int8 (elsewhere {precision})"
    request = compiled.create_infer_request()
    with rasterio.open(nwpu_mosaic(args.data / "nwpu_mosaic_1024.tif", 1024)) as ds:
        a = ds.read(list(range(1, card.bands + 1)), window=Window(0, 0, 512, 512)).astype(np.float32)
    x = (a - np.float32(card.mean)[:, None, None]) / np.float32(card.std)[:, None, None]
    request.infer({0: x})  # warm-up, not counted
    by_op, by_kernel, runs = collections.Counter(), collections.Counter(), 3
    for _ in range(runs):
        out = request.infer({0: x})
        for info in request.profiling_info:
            us = info.real_time.total_seconds() * 1e6
            by_op[info.node_type] += us
            by_kernel[info.exec_type] += us
    total = sum(by_op.values())
    lines = [f"model {args.model} (OpenVINO {ov.__version__.split('-')[0]}, precision {precision}), 512 px tile, "
             f"{args.threads} threads, scan {scan}, {len(out[compiled.output('scores')])} detections; node time over "
             f"{runs} runs "
             f"(after a warm-up): {total / runs / 1e3:.0f} ms per run", "",
             "| operator | ms per run | share |", "|---|---|---|"]
    lines += [f"| {op} | {d / runs / 1e3:.0f} | {100 * d / total:.1f}% |" for op, d in by_op.most_common(15)]
    lines += ["", "| kernel | ms per run | share |", "|---|---|---|"]
    lines += [f"| {k} | {d / runs / 1e3:.0f} | {100 * d / total:.1f}% |" for k, d in by_kernel.most_common(10)]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_int8" if int8 else ""
    (args.out / f"profile_{Path(args.model).stem}_openvino_{scan}{tag}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
