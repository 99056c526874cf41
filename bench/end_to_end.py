"""End to end and streaming: ``rs-engine segment`` with the bundled default model against torchvision's Mask R-CNN
ResNet-50-FPN through the same tiling on the same raster, and peak RSS as the raster grows.

Usage::

    .venv/bin/python bench/end_to_end.py [--quick] [--out bench/results] [--data out/bench] [--threads N]
        [--model nwpu10] [--also MODEL ...] [--baseline PATH] [--side 4096] [--stream-sides 2048,8192,16384]
        [--repeat N]

1. End to end: a ``--side`` px mosaic of real NWPU VHR-10 imagery (GeoTIFF, :func:`bench.common.nwpu_mosaic`),
   segmented by each model with the same ``--tile-size`` and ``--overlap`` (the default model's card values),
   each in a fresh process: megapixels per second of raster (wall time of the whole command: model loading, reading,
   inference, merging and writing the GeoPackage) and the process's peak RSS.
   The baseline is a model file with ``resnet50`` architecture: by default the NWPU VHR-10 baseline trained by
   README "Models" (``--baseline``); a training run's ``.resume.safetensors`` is converted as it stands; without
   either, an untrained ResNet-50-FPN Mask R-CNN with the default model's card is built, its box classifier
   zeroed: every class scores 1/(classes + 1), below any score threshold, so it returns no detection and pastes no
   mask. Its time is the architecture's least (backbone, FPN, RPN and box head on the same 300 proposals): a ratio
   against it is a lower bound of the ratio against a trained baseline, which also pays for its masks (random
   weights kept 15668 random detections whose masks cost most of their time). Marked in the table. ``--also`` adds
   other model files (e.g. the previous default) to the same run; ``--peers`` the networks of ``bench/peers.py``
   (Ultralytics YOLO11n-seg) through the same tiling, reading, merging and writing; ``--runtimes`` the default
   model in PyTorch, ONNX Runtime and, where installed, OpenVINO (``openvino``: its precision and scan, as the
   engine reports them, in the table; ``openvino-graph``: with the exported scan).
   ``--repeat N`` runs the whole list N times, interleaved, and reports each run's median
   seconds (every repeat's seconds in the JSON, ``runs_s``), so a change of load on a shared machine does not
   decide a ratio.
2. Streaming: the default model on mosaics of each ``--stream-sides`` side (same content, tiled GeoTIFFs written
   window by window): peak RSS and Mpx/s. Bounded memory means the peak does not grow with the raster.
3. Ceilings in the same run: fp32 matmul GFLOP/s and the raster read rate of the mosaic (MB/s of decoded pixels,
   window by window as the engine reads).

Writes ``end_to_end.json``, ``end_to_end.md`` and ``end_to_end.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    ROOT,
    last_json,
    machine,
    matmul_gflops,
    nwpu_mosaic,
    pyplot,
    read_mbps,
    run_measured,
    write_outputs,
)

# Where examples/ and README "Models" put training outputs: $WORK, as the example scripts, by default beside the
# repository (never inside it).
WORK = Path(os.environ.get("WORK", ROOT.parent / "delineate-train"))
DEFAULT_BASELINE = WORK / "base" / "nwpu10-resnet50.safetensors"


def segment_cmd(raster: Path, model: str, out: Path, tile: int, overlap: int, batch: int,
                runtime: str = "torch") -> list[str]:
    """``rs-engine segment`` in a child process; ``--progress jsonl`` so the last line reports objects."""
    return [sys.executable, "-m", "rs_engine.cli", "segment", str(raster), "-o", str(out), "--model", model,
            "--device", "cpu", "--tile-size", str(tile), "--overlap", str(overlap), "--batch-size", str(batch),
            "--runtime", runtime, "--overwrite", "--progress", "jsonl"]


def untrained_baseline(path: Path, like: str) -> Path:
    """A ResNet-50-FPN Mask R-CNN model file with ``like``'s card (classes, bands, tiling), random weights and a
    zeroed box classifier (no detection: the architecture's least time)."""
    import torch

    from rs_engine.checkpoint import ModelCard, read_card, save_model
    from rs_engine.models import ModelConfig, build_model

    card = read_card(like)
    arch = {**card.architecture, "backbone": "resnet50"}
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(arch))
    with torch.no_grad():  # uniform class scores: no detection passes the threshold (its fastest case)
        model.roi_heads.box_predictor.cls_score.weight.zero_()
        model.roi_heads.box_predictor.cls_score.bias.zero_()
    new = ModelCard(**{**card.__dict__, "name": "resnet50-untrained", "architecture": arch,
                       "provenance": {"note": "untrained, box classifier zeroed (no detections): for timing only"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, new, half=True)
    return path


def baseline_from_resume(resume: Path, path: Path, like: str) -> tuple[Path, int]:
    """A model file from a training run's resume state (``OUT.resume.safetensors`` of ``rs-train train``) with
    ``like``'s card and ResNet-50 architecture: a baseline still in training, timed as it stands. Returns the file
    and the training step it was saved at."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rs_engine.checkpoint import ModelCard, read_card, save_model
    from rs_engine.models import ModelConfig, build_model

    card = read_card(like)
    arch = {**card.architecture, "backbone": "resnet50"}
    model = build_model(ModelConfig.from_dict(arch))
    model.load_state_dict({k[6:]: v for k, v in load_file(str(resume)).items() if k.startswith("model.")})
    with safe_open(str(resume), framework="pt") as f:
        step = json.loads(f.metadata()["state"])["step"]
    new = ModelCard(**{**card.__dict__, "name": f"resnet50-step{step}", "architecture": arch,
                       "provenance": {"resume": str(resume), "step": step}})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, new, half=True)
    return path, step


def measure(raster: Path, model: str, out_dir: Path, tile: int, overlap: int, batch: int, env: dict,
            timeout: float, runtime: str = "torch") -> dict:
    import rasterio

    with rasterio.open(raster) as ds:
        mpx, side = ds.width * ds.height / 1e6, ds.width
    gpkg = out_dir / f"{Path(model).stem}_{runtime}_{raster.stem}.gpkg"
    load = round(os.getloadavg()[0], 2)
    if model.startswith("peer:"):  # a peer network through the same tiling (bench/peers.py)
        cmd = [sys.executable, str(ROOT / "bench" / "peers.py"), model[5:], str(raster), "-o", str(gpkg),
               "--tile-size", str(tile), "--overlap", str(overlap)]
        model = model[5:]
    else:
        # "torch-chunked": PyTorch with the chunked scan in place of the fused C kernel (DELINEATE_SCAN=chunked);
        # "RUNTIME:sN": with --streams N (concurrent batches; default: one per thread)
        # "openvino-graph": OpenVINO with the exported standard-operator scan (DELINEATE_OPENVINO_SCAN=graph)
        # "openvino-float": OpenVINO's floating point, not the model's int8 file (DELINEATE_OPENVINO_PRECISION=float)
        spec, _, streams = runtime.partition(":s")
        rt = spec.removesuffix("-chunked").removesuffix("-graph").removesuffix("-float")
        if spec.endswith("-chunked"):
            env = {**env, "DELINEATE_SCAN": "chunked"}
        elif spec.endswith("-graph"):
            env = {**env, "DELINEATE_OPENVINO_SCAN": "graph"}
        elif spec.endswith("-float"):
            env = {**env, "DELINEATE_OPENVINO_PRECISION": "float"}
        cmd = segment_cmd(raster, model, gpkg, tile, overlap, batch, rt) + (["--streams", streams] if streams else [])
    r = run_measured(cmd, timeout, env=env)
    done = last_json(r["stdout"]) or {}
    rec = {"raster": raster.name, "side": side, "mpx": round(mpx, 2), "model": Path(model).stem,
           "runtime": runtime, "loadavg_1min": load, "seconds": round(r["seconds"], 1),
           "peak_rss_mb": r["peak_rss_mb"], "rc": r["rc"]}
    if r["rc"] == 0:
        rec["mpx_per_s"] = round(mpx / r["seconds"], 4)
        rec["objects"] = done.get("features")
        if runtime == "auto" and done.get("runtime"):
            rec["runtime"] = done["runtime"]  # what auto picked
        for key in ("precision", "scan"):  # OpenVINO's inference precision (bf16 where the CPU has it) and scan
            if done.get(key):
                rec[key] = done[key]
    elif r["timed_out"]:
        # The kernel's high-water mark still holds for the part that ran: report how far it got.
        prog = [json.loads(line) for line in r["stdout"].splitlines() if line.startswith('{"event": "progress"')]
        last = prog[-1] if prog else {"done": 0, "total": "?"}
        rec["error"] = f"stopped at {timeout:.0f} s, tile {last['done']} of {last['total']}"
        rec["partial"] = True
    else:
        rec["error"] = (r["stderr"].strip().splitlines() or ["?"])[-1][:200]
    print(json.dumps(rec), flush=True)
    return rec


def default_runtimes() -> str:
    """Every runtime installed here (issue 14): PyTorch, ONNX Runtime and OpenVINO when its extra is installed."""
    import importlib.util

    return "torch,onnx" + (",openvino" if importlib.util.find_spec("openvino") else "")


def median_run(recs: list[dict]) -> dict:
    """One record for the repeats of one run: the median seconds (and its Mpx/s), the highest peak RSS and load,
    every repeat's seconds in ``runs_s``; a repeat that failed makes the whole record that failure."""
    failed = [r for r in recs if r["rc"] != 0]
    if failed or len(recs) == 1:
        return failed[0] if failed else recs[0]
    secs = sorted(r["seconds"] for r in recs)
    med = secs[len(secs) // 2] if len(secs) % 2 else (secs[len(secs) // 2 - 1] + secs[len(secs) // 2]) / 2
    out = {**recs[0], "seconds": round(med, 1), "mpx_per_s": round(recs[0]["mpx"] / med, 4), "runs_s": secs,
           "peak_rss_mb": max(r["peak_rss_mb"] for r in recs),
           "loadavg_1min": max(r["loadavg_1min"] for r in recs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 512 px raster, streaming at 256/512: a smoke test")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--data", type=Path, default=ROOT / "out" / "bench", help="where the test rasters are cached")
    ap.add_argument("--threads", type=int, help="OMP/torch threads of the segment processes")
    ap.add_argument("--model", default="nwpu10")
    ap.add_argument("--also", action="append", default=[], metavar="MODEL[@RUNTIME]",
                    help="another model (name or file) timed in the same run, e.g. the previous default; "
                         "@RUNTIME (a --runtimes value) for other than torch, e.g. old/nwpu10.onnx@openvino")
    ap.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--stream-sides", default="2048,8192,16384")
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per segment run (end to end)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the end-to-end runs, interleaved (A B A B ...); the table gives each run's median")
    ap.add_argument("--stream-runtime", default="auto",
                    help="runtime of the streaming runs (default auto: what rs-engine segment picks, OpenVINO where "
                         "installed)")
    ap.add_argument("--stream-timeout", type=float, default=3600,
                    help="seconds per streaming run; a longer one is stopped and its peak RSS so far reported")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: e2e, stream, baseline (the ResNet-50)")
    ap.add_argument("--peers", default="yolo11n-seg",
                    help="comma list of bench/peers.py networks timed through the same tiling ('' for none)")
    ap.add_argument("--runtimes", default=default_runtimes(),
                    help="runtimes the default model is timed in (end to end), each in its own run (default: torch, "
                         "onnx and openvino where installed); torch-chunked: "
                         "PyTorch with the chunked scan instead of the fused C kernel; openvino-graph: OpenVINO with "
                         "the exported standard-operator scan; openvino-float: OpenVINO's floating point "
                         "instead of the model's int8 file; RUNTIME:sN: with --streams N")
    args = ap.parse_args()
    side = 512 if args.quick else args.side
    stream = [256, 512] if args.quick else [int(s) for s in args.stream_sides.split(",")]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = machine()
    info["matmul_gflops"] = round(matmul_gflops(), 1)
    args.data.mkdir(parents=True, exist_ok=True)
    mosaic = nwpu_mosaic(args.data / f"nwpu_mosaic_{side}.tif", side)
    info["read"] = read_mbps(mosaic)
    print(json.dumps(info), flush=True)
    record: dict = {"machine": info, "tile_size": args.tile_size, "overlap": args.overlap, "e2e": [], "stream": []}
    skip = set(args.skip.split(","))
    if "e2e" not in skip:
        baseline, role = args.baseline, "baseline (trained)"
        if baseline.name.endswith(".resume.safetensors") and baseline.is_file():
            baseline, step = baseline_from_resume(baseline, args.data / "resnet50-partial.safetensors", args.model)
            role = f"baseline (in training, step {step})"
        elif not baseline.is_file():
            baseline, role = untrained_baseline(args.data / "resnet50-untrained.safetensors", args.model), \
                "baseline (untrained, no detections: its least time)"
        runs = [(args.model, rt, "default model") for rt in args.runtimes.split(",")]
        runs += [(*(m.rsplit("@", 1) if "@" in m else (m, "torch")), "compared") for m in args.also]
        runs += [(f"peer:{p}", "torch", "peer (untrained weights)") for p in args.peers.split(",") if p]
        runs += [(str(baseline), "torch", role)]
        if "baseline" in skip:
            runs.pop()
        rounds: list[list[dict]] = []
        for _ in range(max(1, args.repeat)):  # interleaved, so a change in the machine's load hits every run alike
            rounds.append([])
            for model, runtime, what in runs:
                rec = measure(mosaic, model, args.data, args.tile_size, args.overlap, args.batch_size, env,
                              args.timeout, runtime)
                rec["role"] = what
                rounds[-1].append(rec)
        record["e2e"] = [median_run(list(same)) for same in zip(*rounds)]
    if "stream" not in skip:
        for s in stream:
            raster = nwpu_mosaic(args.data / f"nwpu_mosaic_{s}.tif", s)
            record["stream"].append(measure(raster, args.model, args.data, args.tile_size, args.overlap,
                                            args.batch_size, env, args.stream_timeout, args.stream_runtime))
    write_outputs(args.out, "end_to_end", record, _table(record))
    _plot(record, args.out / "end_to_end.png")


def _table(rec: dict) -> str:
    info = rec["machine"]
    lines = []
    if rec["e2e"]:
        lines += ["| model | runtime | role | raster | Mpx/s | seconds | peak RSS (MB) | objects | load avg. |",
                  "|" + "---|" * 9]
        for r in rec["e2e"]:
            lines.append(f"| {r['model']} | {_runtime(r)} | {r['role']} | {r['raster']} "
                         f"({r['mpx']} Mpx) | {r.get('mpx_per_s', '-')} | "
                         f"{r['seconds']}{_spread(r)} | {r['peak_rss_mb']} | {r.get('objects', r.get('error', '-'))} | "
                         f"{r.get('loadavg_1min', '-')} |")
        ok = [r for r in rec["e2e"] if "mpx_per_s" in r]
        if len(ok) >= 2:
            lines.append("\n" + "; ".join(f"speed-up of {ok[0]['model']} ({ok[0].get('runtime', 'torch')}) over "
                                           f"{r['model']} ({r.get('runtime', 'torch')}): "
                                           f"{ok[0]['mpx_per_s'] / r['mpx_per_s']:.2f}x" for r in ok[1:]) + ".")
    if rec["stream"]:
        lines += ["", "| raster side (px) | runtime | Mpx | Mpx/s | seconds | peak RSS (MB) | objects |",
                  "|---|---|---|---|---|---|---|"]
        for r in rec["stream"]:
            lines.append(f"| {r['side']} | {_runtime(r)} | {r['mpx']} | {r.get('mpx_per_s', '-')} | {r['seconds']} | "
                         f"{r['peak_rss_mb']} | {r.get('objects', r.get('error', '-'))} |")
        ok = [r for r in rec["stream"] if r["rc"] == 0 or r.get("partial")]
        if len(ok) >= 2:
            lines.append(f"\nPeak RSS at the largest raster / at the smallest: "
                         f"{ok[-1]['peak_rss_mb'] / ok[0]['peak_rss_mb']:.3f}.")
    lines.append(f"\nTiles {rec['tile_size']} px, overlap {rec['overlap']} px, CPU, {info['threads']} threads "
                 f"({info['cpu']}); fp32 matmul peak {info['matmul_gflops']} GFLOP/s; raster read "
                 f"{info['read']['first_pass_mbps']} MB/s first pass, {info['read']['warm_mbps']} MB/s warm "
                 f"(decoded pixels, 512 px windows); load average at start {info['loadavg_1min']}. Seconds: the whole "
                 "`rs-engine segment` command (load, read, infer, merge, write).")
    return "\n".join(lines)


def _runtime(r: dict) -> str:
    """The runtime of a record, with its precision and scan where the engine reported them
    (``openvino (bf16, fused scan)``)."""
    extra = ", ".join(v for v in (r.get("precision"), r.get("scan") and f"{r['scan']} scan") if v)
    return r.get("runtime", "torch") + (f" ({extra})" if extra else "")


def _spread(r: dict) -> str:
    """`` (min-max of N)`` for a repeated run, else nothing."""
    runs = r.get("runs_s")
    return f" ({runs[0]}-{runs[-1]}, median of {len(runs)})" if runs else ""


def _plot(rec: dict, png: Path) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100, gridspec_kw={"width_ratios": [1.4, 1]})
    ok = [r for r in rec["e2e"] if "mpx_per_s" in r][::-1]  # top to bottom in table order
    labels = [f"{r['model']} {r.get('runtime', 'torch')}\n{r['role'].split(' (')[0]}" for r in ok]
    a1.barh(labels, [r["mpx_per_s"] for r in ok],
            color=["tab:green" if r["role"] == "default model" else "tab:gray" for r in ok])  # fmt: skip
    a1.tick_params(axis="y", labelsize=8)
    a1.set_xlabel("megapixels per second")
    a1.set_title("end to end, same raster and tiling", fontsize=10)
    st = [r for r in rec["stream"] if r["rc"] == 0 or r.get("partial")]
    if st:
        sides = [r["side"] for r in st]
        a2.plot(sides, [r["peak_rss_mb"] for r in st], "o-")
        a2.set_xscale("log", base=2)
        a2.set_ylim(0, max(r["peak_rss_mb"] for r in st) * 1.3)
        a2.set_xlabel("raster side (px)")
        a2.set_ylabel("peak RSS (MB)")
        a2.set_title("streaming: peak memory vs raster size", fontsize=10)
        a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
