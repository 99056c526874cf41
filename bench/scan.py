"""Benchmark: the fused C selective scan and the chunked PyTorch scan vs the per-token loop reference, on the CPU.

Usage::

    .venv/bin/python bench/scan.py [--quick] [--dim 512] [--length 16384] [--out bench/results] [--profile]

At a realistic Mamba-layer size (batch 1, dim 512, dstate 16, L 16384, with D, z, delta_bias and softplus as
a Mamba block calls it) it times, in one run, :func:`selective_scan_fused` (the C kernel, when it builds),
:func:`selective_scan_chunked` at several chunk sizes and :func:`selective_scan_ref` in float32 (mamba-ssm's
token-by-token loop), each after a warm-up call, and reports median and minimum wall times, the speed-ups over the
loop and of the fused kernel over the default chunked scan, each one's error against :func:`selective_scan_ref` in
float64 (max |y - y64| / max |y64|), and forward + backward (training) times of the fused and chunked scans.
Writes ``scan.json`` and ``scan.md`` (and with ``--profile`` ``scan_profile.txt``, a torch.profiler table
of one chunked call) into the ``--out`` folder. ``--quick`` uses L = 512 and fewer repeats (smoke test).

Timings on a shared machine are noisy: the load average is recorded; compare minima when in doubt.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rs_engine.ops.scan_fused import fused_cpu_available, fused_cpu_status  # noqa: E402
from rs_engine.ops.selective_scan import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    selective_scan_chunked,
    selective_scan_fused,
    selective_scan_ref,
)

logger = logging.getLogger("bench.scan")


def make_inputs(batch: int, dim: int, dstate: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 inputs shaped like a Mamba-1 layer's (S4D-real A, dt bias for dt in [1e-3, 1e-1])."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    dt = torch.exp(
        torch.rand(dim, generator=g, dtype=f64) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
        + torch.log(torch.tensor(1e-3))
    )
    return {
        "u": torch.randn(batch, dim, length, generator=g, dtype=f64),
        "delta": 0.5 * torch.randn(batch, dim, length, generator=g, dtype=f64),
        "A": -torch.arange(1, dstate + 1, dtype=f64).expand(dim, dstate).contiguous(),
        "B": torch.randn(batch, dstate, length, generator=g, dtype=f64),
        "C": torch.randn(batch, dstate, length, generator=g, dtype=f64),
        "D": torch.ones(dim, dtype=f64),
        "z": torch.randn(batch, dim, length, generator=g, dtype=f64),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, as Mamba's dt_proj init
    }


def call(fn: Callable, x: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], delta_softplus=True, **kw)


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[list[float], torch.Tensor]:
    """Wall times (s) of ``repeats`` calls after one warm-up call, and the last result."""
    with torch.inference_mode():
        out = fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return times, out


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _forward_backward(x32: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Min wall time (s) of forward + backward of sum(out) through the fused and the default chunked scan."""
    out: dict[str, float] = {}
    for name, fn in (("fused", selective_scan_fused), ("chunked", selective_scan_chunked)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x32.items()}
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            t0 = time.perf_counter()
            call(fn, leaves).sum().backward()
            times.append(time.perf_counter() - t0)
        out[name] = min(times[1:])
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small L and fewer repeats (smoke test)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=None, help="tokens (default 16384, 512 with --quick)")
    p.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64], help="chunk sizes to time")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 5, quick 2)")
    p.add_argument("--ref-repeats", type=int, default=None, help="timed loop calls (default 3, quick 1)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--profile", action="store_true", help="also write a torch.profiler table of one call")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    length = a.length or (512 if a.quick else 16384)
    repeats = a.repeats or (2 if a.quick else 5)
    ref_repeats = a.ref_repeats or (1 if a.quick else 3)
    chunks = sorted(set(a.chunks) | {DEFAULT_CHUNK_SIZE})
    a.out.mkdir(parents=True, exist_ok=True)
    x64 = make_inputs(a.batch, a.dim, a.dstate, length)
    x32 = {k: v.float() for k, v in x64.items()}
    size = f"batch {a.batch}, dim {a.dim}, dstate {a.dstate}, L {length}"
    logger.info(
        "selective scan benchmark: %s; torch %s, %d threads, %s",
        size,
        torch.__version__,
        torch.get_num_threads(),
        cpu_name(),
    )

    # The fused kernel and the chunked variants first, their repeats interleaved round-robin so machine noise hits
    # all alike; then the loop; the float64 reference last (it allocates gigabytes, and the page reclaim that
    # follows slows whatever runs next).
    rows: list[dict] = []
    outputs: list[torch.Tensor] = []
    variants: dict[tuple[str, int | None], Callable[[], torch.Tensor]] = {}
    if fused_cpu_available():
        variants["fused", None] = lambda: call(selective_scan_fused, x32)
    else:
        logger.info("%s", fused_cpu_status())
    for c in chunks:
        variants["chunked", c] = lambda c=c: call(selective_scan_chunked, x32, chunk_size=c)
    with torch.inference_mode():
        times_by: dict[tuple[str, int | None], list[float]] = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times_by[k].append(time.perf_counter() - t0)
        for (name, c), times in times_by.items():
            rows.append(
                {
                    "implementation": name,
                    "chunk_size": c,
                    "times_s": times,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                }
            )
            outputs.append(variants[name, c]())
            logger.info(
                "%-7s T=%-4s median %8.1f ms  min %8.1f ms",
                name,
                c,
                rows[-1]["median_s"] * 1e3,
                rows[-1]["min_s"] * 1e3,
            )
    training = _forward_backward(x32, max(1, repeats // 2)) if fused_cpu_available() else {}
    times, y = timed(lambda: call(selective_scan_ref, x32), ref_repeats)
    loop = {
        "implementation": "per-token loop (selective_scan_ref, float32)",
        "chunk_size": None,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
    }
    outputs.append(y)
    logger.info("per-token loop    median %8.1f ms  min %8.1f ms", loop["median_s"] * 1e3, loop["min_s"] * 1e3)
    del y
    t0 = time.perf_counter()
    with torch.inference_mode():
        y64 = call(selective_scan_ref, x64)
    logger.info("float64 reference (per-token loop): %.1f s", time.perf_counter() - t0)
    for r, y in zip([*rows, loop], outputs, strict=True):
        r["rel_err_vs_float64"] = rel_err(y, y64)
        logger.info(
            "error vs float64: %-45s T=%-4s %.2e", r["implementation"], r["chunk_size"], r["rel_err_vs_float64"]
        )
    default = next(r for r in rows if r["chunk_size"] == DEFAULT_CHUNK_SIZE)
    fused = next((r for r in rows if r["implementation"] == "fused"), None)
    best = min((r for r in rows if r["implementation"] == "chunked"), key=lambda r: r["median_s"])
    for r in rows:
        r["speedup_vs_loop_median"] = loop["median_s"] / r["median_s"]
        r["speedup_vs_loop_min"] = loop["min_s"] / r["min_s"]
    loop["speedup_vs_loop_median"] = loop["speedup_vs_loop_min"] = 1.0
    logger.info(
        "speed-up of the default chunk size (%d) over the loop: %.1fx (median), %.1fx (min)",
        DEFAULT_CHUNK_SIZE,
        default["speedup_vs_loop_median"],
        default["speedup_vs_loop_min"],
    )
    if fused:
        fused["speedup_vs_chunked_median"] = default["median_s"] / fused["median_s"]
        logger.info(
            "fused kernel: %.1fx the loop (median), %.2fx the default chunked scan (median)",
            fused["speedup_vs_loop_median"],
            fused["speedup_vs_chunked_median"],
        )

    result = {
        "size": {"batch": a.batch, "dim": a.dim, "dstate": a.dstate, "length": length},
        "call": "selective_scan_*(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)",
        "default_chunk_size": DEFAULT_CHUNK_SIZE,
        "speedup_default_vs_loop_median": default["speedup_vs_loop_median"],
        "speedup_default_vs_loop_min": default["speedup_vs_loop_min"],
        "speedup_fused_vs_loop_median": fused["speedup_vs_loop_median"] if fused else None,
        "speedup_fused_vs_chunked_median": fused["speedup_vs_chunked_median"] if fused else None,
        "forward_backward_s": training,
        "fused_status": fused_cpu_status(),
        "fastest_chunk_size": best["chunk_size"],
        "rows": [*rows, loop],
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
            "quick": a.quick,
        },
    }
    (a.out / "scan.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Selective scan on the CPU: {size}",
        "",
        f"Call: `{result['call']}`; torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}. "
        f"Median and minimum of {repeats} timed calls ({ref_repeats} for the loop) after a warm-up call. "
        "Error: max |y - y64| / max |y64| against the per-token loop in float64. "
        f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        "",
        "| implementation | chunk | median (ms) | min (ms) | speed-up vs loop (median / min) | error vs float64 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in [*rows, loop]:
        lines.append(
            f"| {r['implementation']} | {r['chunk_size'] or '-'} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} "
            f"| {r['speedup_vs_loop_median']:.1f}x / {r['speedup_vs_loop_min']:.1f}x | {r['rel_err_vs_float64']:.1e} |"
        )
    if training:
        lines += [
            "",
            f"Forward + backward (training), min of {max(1, repeats // 2)}: fused {training['fused'] * 1e3:.1f} ms, "
            f"chunked (T={DEFAULT_CHUNK_SIZE}) {training['chunked'] * 1e3:.1f} ms, "
            f"{training['chunked'] / training['fused']:.2f}x. {fused_cpu_status()}.",
        ]
    (a.out / "scan.md").write_text("\n".join(lines) + "\n")

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            call(selective_scan_chunked, x32)
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=24, max_shapes_column_width=90
        )
        (a.out / "scan_profile.txt").write_text(table + "\n")
    logger.info("wrote %s", ", ".join(str(a.out / f) for f in ("scan.json", "scan.md")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
