"""Backbone cost: params, GFLOPs at 512 and 1024 px, and CPU time per 512 px tile, for each backbone variant,
with torchvision's ResNet-50 (+FPN) measured in the same run as the baseline.

Usage: python bench/backbones.py [--quick] [--out bench/results] [--names ssm_tiny,rs4d_s,...]
Writes backbones.json and backbones.md into --out. Times are medians over repeats after a warm-up; the
machine is shared, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rs_engine.models import BACKBONES, ModelConfig, build_model, count_flops


def time_forward(net: torch.nn.Module, size: int, repeats: int, batch: int = 1) -> float:
    """Median seconds of one forward pass of a (batch, 3, size, size) input (inference mode)."""
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        net(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, 256 px: a smoke test")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--names", default=",".join([*BACKBONES, "resnet50"]))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size, repeats = (256, 1) if args.quick else (512, 3)
    rows = []
    for name in args.names.split(","):
        model = build_model(ModelConfig(backbone=name, tile_size=size)).eval()
        f512 = count_flops(model, 512)
        f1024 = count_flops(model, 1024) if not args.quick else {"backbone_gflops": float("nan")}
        body = model.backbone.body
        seconds = time_forward(body, size, repeats)
        rows.append({
            "backbone": name, "params_m": round(sum(p.numel() for p in body.parameters()) / 1e6, 2),
            "gflops_512": round(f512["backbone_gflops"], 2), "gflops_1024": round(f1024["backbone_gflops"], 2),
            "scan_gflops_512": round(f512["scan_gflops"], 2), "tile_px": size, "cpu_s_per_tile": round(seconds, 3),
            "threads": torch.get_num_threads(),
        })
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "backbones.json").write_text(json.dumps(rows, indent=1))
    head = "| backbone | params (M) | GFLOPs 512 | GFLOPs 1024 | of which scan (512) | CPU s / tile |"
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['params_m']} | {r['gflops_512']} | {r['gflops_1024']} | "
                     f"{r['scan_gflops_512']} | {r['cpu_s_per_tile']} ({r['tile_px']} px) |")
    lines.append("\nParams and GFLOPs of the backbone body (no FPN/heads); GFLOPs count a multiply-add as 2 and "
                 "include the selective scans (9 L D N). CPU time: backbone body only, "
                 f"batch 1, {rows[0]['threads']} threads, median of {repeats}.")
    (args.out / "backbones.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
