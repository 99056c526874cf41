"""Backbone scaling: CPU time per megapixel and peak memory at tiles of 256 to 2048 px, params and GFLOPs, for each
SSM size, the heat backbones, a ViT-B with global attention (the SAM-style teacher) and ResNet-50-FPN, with the
CPU's matrix-product rate measured in the same run.

Usage::

    .venv/bin/python bench/backbones.py [--quick] [--out bench/results] [--names ssm_tiny,vit_b_global,...]
        [--sizes 256,512,1024,2048] [--threads N] [--timeout 600] [--mem-cap-gb 12]

What is timed is the feature extractor a detector runs: the backbone body and its neck (the FPN of the Mask R-CNN
models, SAM's 256-channel neck for the ViT-B), batch 1, inference mode, median of several forward passes after a
warm-up. Params and GFLOPs are of the body alone (the figure papers compare: RS4D's student vs teacher), from
``torch.utils.flop_counter`` plus the analytic cost of selective scans (:func:`rs_engine.models.count_flops`);
a multiply-add is 2 FLOPs. Each (model, size) runs in a fresh process: its peak RSS is the kernel's high-water mark
for that process, and "activations" is that peak minus the RSS after building the model. A process over
``--timeout`` seconds or over ``--mem-cap-gb`` of address space is reported as such, not retried.

The ViT-B is segment-anything's ``ImageEncoderViT`` with SAM ViT-B's sizes (embed 768, depth 12, 12 heads, relative
positions) and global attention in every block (``window_size=0``), built for each tile size (its absolute position
embedding is per size). Writes ``backbones.json``, ``backbones.md`` and ``backbones.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import last_json, machine, matmul_gflops, pyplot, run_measured, write_outputs  # noqa: E402

#: Every family: pure SSM, hybrid (the defaults' body), RS4D, heat conduction, the pretrained CNN, and the peers.
DEFAULT_NAMES = ("ssm_tiny,ssm_small,ssm_base,ssm_hybrid_tiny,rs4d_s,heat_tiny,heat_small,effnet_lite2,vit_b_global,"
                 "resnet50")
LABELS = {"vit_b_global": "ViT-B global attn (SAM-style)", "resnet50": "ResNet-50-FPN"}


def build(name: str, size: int):  # noqa: ANN201
    """``(extractor, body, neck_input_or_None)``: the module timed and the body counted."""
    import torch
    from torch import nn

    if name == "vit_b_global":
        from segment_anything.modeling.image_encoder import ImageEncoderViT

        enc = ImageEncoderViT(img_size=size, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                              out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=0, global_attn_indexes=())
        neck = enc.neck
        body = _ViTBody(enc)
        return enc, body, neck
    from rs_engine.models import ModelConfig, build_model

    model = build_model(ModelConfig(backbone=name, tile_size=size))
    torch.manual_seed(0)
    return model.backbone, model.backbone.body, None


class _ViTBody:
    """SAM's encoder without its neck, as a callable for the FLOP counter."""

    def __init__(self, enc) -> None:  # noqa: ANN001
        self.enc = enc

    def __call__(self, x):  # noqa: ANN001, ANN204
        e = self.enc
        x = e.patch_embed(x)
        if e.pos_embed is not None:
            x = x + e.pos_embed
        for blk in e.blocks:
            x = blk(x)
        return x

    def parameters(self):  # noqa: ANN201
        return (p for n, p in self.enc.named_parameters() if not n.startswith("neck."))


def body_flops(body, size: int) -> float:  # noqa: ANN001
    """GFLOPs of the body on one (3, size, size) tile: the project's own count (``count_flops``: scans included,
    heat decay maps precomputed as at inference) for its bodies, the FLOP counter alone for the ViT."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rs_engine.models.build import count_flops

    if isinstance(body, torch.nn.Module):
        return count_flops(body, size)["backbone_gflops"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        body(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def child(name: str, size: int, repeats: int, flops: bool) -> None:
    """Measure one (model, size) in this process; print one JSON line."""
    import psutil
    import torch

    ext, body, _ = build(name, size)
    ext.eval()
    rec = {"backbone": name, "size": size, "threads": torch.get_num_threads(),
           "params_m": round(sum(p.numel() for p in body.parameters()) / 1e6, 2)}
    rss_built = psutil.Process().memory_info().rss / 2**20
    x = torch.randn(1, 3, size, size)
    from bench.common import peak_rss_mb

    with torch.inference_mode():
        t = time.perf_counter()
        ext(x)  # warm-up (allocator, caches of bases and decay maps)
        warm = time.perf_counter() - t
        # Slow models get fewer repeats, so that every (model, size) fits the time limit.
        repeats = min(repeats, max(1, int(60 / max(warm, 1e-3))))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ext(x)
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    rec.update(seconds=round(seconds, 4), s_per_mpx=round(seconds / (size * size / 1e6), 4),
               peak_rss_mb=round(peak_rss_mb(), 1), activations_mb=round(peak_rss_mb() - rss_built, 1),
               repeats=repeats)
    if flops:
        rec["gflops"] = round(body_flops(body, size), 2)
        rec["gflops_per_s"] = round(rec["gflops"] / seconds, 1)  # body FLOPs over extractor time: a lower bound
    print(json.dumps(rec), flush=True)


def linearity(name: str, rounds: int, small: int = 256, large: int = 2048) -> None:
    """Time per pixel at ``large`` over that at ``small``, measured interleaved in one process: each round times
    ``(large / small)^2`` tiles of ``small`` px then one tile of ``large`` px, so both see the same machine load.
    Prints one JSON line with the per-round figures and the ratio of medians and of minima."""
    import torch

    ext, _, _ = build(name, small)
    if name == "vit_b_global":
        raise SystemExit("the ViT-B's position embedding is per size: not measured interleaved")
    ext.eval()
    xs, xl = torch.randn(1, 3, small, small), torch.randn(1, 3, large, large)
    n = (large // small) ** 2
    per_small, per_large = [], []
    with torch.inference_mode():
        ext(xs)
        ext(xl)
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                ext(xs)
            per_small.append((time.perf_counter() - t) / (n * small * small / 1e6))
            t = time.perf_counter()
            ext(xl)
            per_large.append((time.perf_counter() - t) / (large * large / 1e6))
    print(json.dumps({"backbone": name, "small": small, "large": large, "rounds": rounds,
                      "s_per_mpx_small": [round(v, 4) for v in per_small],
                      "s_per_mpx_large": [round(v, 4) for v in per_large],
                      "ratio_median": round(statistics.median(per_large) / statistics.median(per_small), 3),
                      "ratio_min": round(min(per_large) / min(per_small), 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 and 512 px, one repeat: a smoke test")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--names", default=DEFAULT_NAMES)
    ap.add_argument("--sizes", default="256,512,1024,2048")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--merge", type=Path, help="a previous backbones.json: its rows are kept unless re-measured")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per (model, size) before giving up")
    ap.add_argument("--mem-cap-gb", type=float, default=12.0, help="address-space cap of each measured process")
    ap.add_argument("--linear-names", default="ssm_tiny,ssm_small,heat_tiny,resnet50",
                    help="those of --names whose time per pixel at 2048 vs 256 px is also measured interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved measurement")
    ap.add_argument("--child", nargs=4, metavar=("NAME", "SIZE", "REPEATS", "FLOPS"), help=argparse.SUPPRESS)
    ap.add_argument("--linear-child", metavar="NAME", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.linear_child:
        linearity(args.linear_child, args.rounds)
        return
    if args.child:
        name, size, repeats, flops = args.child
        child(name, int(size), int(repeats), flops == "1")
        return
    sizes = [256, 512] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    info = machine()
    if args.threads:
        info["threads"] = args.threads
    info["matmul_gflops"] = round(matmul_gflops(), 1)
    print(json.dumps(info), flush=True)
    rows = []
    for name in [n for n in args.names.split(",") if n]:
        for size in sizes:
            repeats = 1 if args.quick else {256: 7, 512: 5, 1024: 3}.get(size, 1)
            cmd = [sys.executable, __file__, "--child", name, str(size), str(repeats),
                   "1" if size in (512, 1024) or args.quick else "0"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            r = run_measured(cmd, args.timeout, env=env, mem_cap_gb=args.mem_cap_gb)
            rec = last_json(r["stdout"]) if r["rc"] == 0 else None
            if rec is None:
                err = (r["stderr"].strip().splitlines() or ["?"])[-1]
                status = (f"over {args.timeout:.0f} s" if r["timed_out"] else
                          f"out of memory (> {args.mem_cap_gb:g} GB)" if "alloc" in err.lower() or
                          "memory" in err.lower() else f"failed: {err[:120]}")
                rec = {"backbone": name, "size": size, "status": status, "peak_rss_mb": r["peak_rss_mb"]}
            else:
                rec["status"] = "ok"
            rec["matmul_gflops"] = info["matmul_gflops"]  # the ceiling of this run, for merged tables
            rows.append(rec)
            print(json.dumps(rec), flush=True)
            if rec["status"] != "ok":
                break  # larger tiles of the same model will not fare better
    linear = []
    measured = {n for n in args.names.split(",") if n}
    for name in [] if args.quick else [n for n in args.linear_names.split(",") if n and n in measured]:
        cmd = [sys.executable, __file__, "--linear-child", name, "--rounds", str(args.rounds)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = run_measured(cmd, args.timeout * 3, env=env, mem_cap_gb=args.mem_cap_gb)
        rec = last_json(r["stdout"]) if r["rc"] == 0 else {"backbone": name, "status": "failed"}
        linear.append(rec)
        print(json.dumps(rec), flush=True)
    if args.merge:
        old = json.loads(args.merge.read_text())
        new = {(r["backbone"], r["size"]) for r in rows}
        for r in old["rows"]:
            r.setdefault("matmul_gflops", old["machine"]["matmul_gflops"])
        rows = [r for r in old["rows"] if (r["backbone"], r["size"]) not in new] + rows
        sizes = sorted({r["size"] for r in rows})
        linear = linear or old.get("linearity", [])
        if not new and not args.linear_names:  # nothing measured: the previous run's conditions stand
            info = old["machine"]
        else:
            info["merged_from"] = {k: v for k, v in old["machine"].items() if k != "merged_from"}
    table = _table(rows, sizes, info) if rows else ""
    if linear:
        table += ("\n\n| backbone | s/Mpx 256 (median) | s/Mpx 2048 (median) | ratio of medians | ratio of minima |\n"
                  "|---|---|---|---|---|\n")
        for r in linear:
            if "ratio_median" in r:
                table += (f"| {LABELS.get(r['backbone'], r['backbone'])} | {statistics.median(r['s_per_mpx_small'])} | "
                          f"{statistics.median(r['s_per_mpx_large'])} | {r['ratio_median']}x | {r['ratio_min']}x |\n")
        table += (f"\nInterleaved in one process ({args.rounds} rounds of 64 tiles of 256 px, then one of 2048 px), so "
                  "both sizes see the same machine load: the linearity figure.")
    record = {"machine": info, "rows": rows, "linearity": linear}
    write_outputs(args.out, "backbones", record, table)
    _plot(rows, args.out / "backbones.png", info)


def _get(rows: list[dict], name: str, size: int) -> dict | None:
    return next((r for r in rows if r["backbone"] == name and r["size"] == size), None)


def _table(rows: list[dict], sizes: list[int], info: dict) -> str:
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    # GFLOPs and the share of the ceiling: at 1024 px where measured, else 512 (the sizes whose FLOPs are counted)
    ref = next((r for r in (1024, 512) if r in sizes), sizes[-1])
    head = (f"| backbone | params (M) | GFLOPs {ref} | " + " | ".join(f"s/Mpx {s}" for s in sizes)
            + f" | growth {sizes[-1]}/{sizes[0]} | " + " | ".join(f"act. MB {s}" for s in sizes)
            + f" | % of matmul peak ({ref}) |")
    lines = [head, "|" + "---|" * (5 + 2 * len(sizes))]
    for n in names:
        cells = [LABELS.get(n, n)]
        r1024 = _get(rows, n, ref) or {}
        # The ViT's parameter count depends on the size (position tables): the 1024 px figure where there is one.
        params = r1024.get("params_m") or next((r["params_m"] for r in rows if r["backbone"] == n and "params_m" in r),
                                               None)
        cells += [str(params), str(r1024.get("gflops", "-"))]
        for s in sizes:
            r = _get(rows, n, s)
            cells.append("-" if r is None else str(r.get("s_per_mpx", r.get("status"))))
        first, last = _get(rows, n, sizes[0]), _get(rows, n, sizes[-1])
        growth = (last["s_per_mpx"] / first["s_per_mpx"] if first and last and "s_per_mpx" in last
                  and "s_per_mpx" in first else None)
        cells.append(f"{growth:.2f}x" if growth else "-")
        for s in sizes:
            r = _get(rows, n, s)
            cells.append("-" if r is None else str(r.get("activations_mb", r.get("status"))))
        frac = r1024.get("gflops_per_s")
        peak = r1024.get("matmul_gflops", info["matmul_gflops"])
        cells.append(f"{100 * frac / peak:.0f}%" if frac else "-")
        lines.append("| " + " | ".join(cells) + " |")
    peaks = sorted({r.get("matmul_gflops", info["matmul_gflops"]) for r in rows})
    lines.append(
        f"\nCPU: {info['cpu']}, {info['threads']} threads, fp32 matmul peak {' / '.join(map(str, peaks))} GFLOP/s "
        f"(measured in the run of each row); load average at start {info['loadavg_1min']}. s/Mpx: seconds per "
        "megapixel of one forward pass of body + neck at that tile size (batch 1). Growth: s/Mpx at the largest "
        "tile over the smallest (1.0 = linear cost in pixels). act. MB: peak RSS minus RSS after building the "
        "model. % of matmul peak: body GFLOPs / extractor time / matmul peak.")
    return "\n".join(lines)


def _plot(rows: list[dict], png: Path, info: dict) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for n in dict.fromkeys(r["backbone"] for r in rows):
        ok = [r for r in rows if r["backbone"] == n and r.get("status") == "ok"]
        if not ok:
            continue
        xs = [r["size"] for r in ok]
        a1.plot(xs, [r["s_per_mpx"] for r in ok], "o-", label=LABELS.get(n, n))
        a2.plot(xs, [max(r["activations_mb"], 1) for r in ok], "o-", label=LABELS.get(n, n))
    for a, t in ((a1, "CPU seconds per megapixel"), (a2, "activation memory (MB, peak RSS - model)")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("tile side (px)")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(f"Backbone scaling, {info['threads']} CPU threads ({info['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
