"""Time of one Mask R-CNN training step on the CPU, the default kernels against the ones they replaced.

Usage::

    .venv/bin/python bench/train_step.py [--backbone ssm_hybrid_tiny] [--chip-size 256] [--batch 2] [--steps 6]
        [--threads 1] [--out bench/results]

Real NWPU VHR-10 training chips (the four images of ``tests/training/test_overfit.py``, top-left chips), the
model built by ``build_model``, AdamW, forward + backward + step as ``rs-train train`` runs them. Variants, each
in its own process (the kernels are chosen at import), timed round-robin so machine noise hits all alike:

* ``default``: what training runs now, the fused C selective scan and :class:`FastMultiScaleRoIAlign`;
* ``torchvision-roialign``: torchvision's ``MultiScaleRoIAlign`` (its scalar CPU backward) in both heads;
* ``chunked-scan``: the chunked PyTorch scan (``DELINEATE_SCAN=chunked``);
* ``before``: both replaced, the training step of the previous sessions.

Writes ``train_step.json`` and ``train_step.md`` (median and min seconds per step, speed-up of ``default``) with the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NWPU = ROOT.parent / "shared" / "data" / "nwpu_vhr10"
IMAGE_IDS = [24, 103, 326, 295]
VARIANTS = {
    "default": {},
    "torchvision-roialign": {"BENCH_TV_ROIALIGN": "1"},
    "chunked-scan": {"DELINEATE_SCAN": "chunked"},
    "before": {"BENCH_TV_ROIALIGN": "1", "DELINEATE_SCAN": "chunked"},
}


def _one_variant(args: argparse.Namespace) -> None:
    """In the child: build, warm up, then time ``args.steps`` steps; print their seconds as JSON."""
    import torch
    from torchvision.ops import MultiScaleRoIAlign

    sys.path.insert(0, str(ROOT))
    from rs_engine.models import ModelConfig, build_model
    from training.coco import ChipSpec, CocoChips

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    coco = json.loads((NWPU / "annotations" / "instances_train.json").read_text())
    sub = {**coco, "images": [i for i in coco["images"] if i["id"] in IMAGE_IDS],
           "annotations": [a for a in coco["annotations"] if a["image_id"] in IMAGE_IDS]}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "chips.json").write_text(json.dumps(sub))
        chips = CocoChips(Path(tmp) / "chips.json", NWPU / "images",
                          ChipSpec(args.chip_size, [0, 1, 2], [0.0] * 3, [1.0] * 3), train=False)
        items = [chips[i % len(chips)] for i in range(args.batch)]
    model = build_model(ModelConfig(backbone=args.backbone, num_classes=len(chips.class_names),
                                    tile_size=args.chip_size)).train()
    if os.environ.get("BENCH_TV_ROIALIGN"):
        model.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
        model.roi_heads.mask_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    xs, ts = [x for x, _ in items], [t for _, t in items]
    times = []
    for i in range(args.steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        loss = sum(model(xs, ts).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ssm_hybrid_tiny")
    ap.add_argument("--chip-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (in rounds of 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        _one_variant(args)
        return 0
    if not NWPU.is_dir():
        print(f"{NWPU} is absent", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    load = [os.getloadavg()[0]]
    for _ in range(max(1, args.steps // 2)):
        for name, env in VARIANTS.items():
            cmd = [sys.executable, __file__, "--variant", name, "--steps", "2", "--backbone", args.backbone,
                   "--chip-size", str(args.chip_size), "--batch", str(args.batch), "--threads", str(args.threads),
                   "--out", str(args.out)]
            r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **env},
                               capture_output=True, text=True, check=True)
            times[name] += json.loads(r.stdout.strip().splitlines()[-1])
    load.append(os.getloadavg()[0])
    rows = {n: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for n, t in times.items()}
    base = rows["default"]["median_s"]
    for r in rows.values():
        r["default_speedup"] = r["median_s"] / base
    record = {"backbone": args.backbone, "chip_size": args.chip_size, "batch": args.batch, "threads": args.threads,
              "loadavg_1min": load, "rows": rows}
    (args.out / "train_step.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Training step on the CPU: {args.backbone}, {args.batch} chips of {args.chip_size} px, "
             f"{args.threads} thread(s)", "",
             f"Load average (1 min) at start and end: {load[0]:.2f}, {load[1]:.2f}.", "",
             "| variant | median s/step | min s/step | default is faster by |", "|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['default_speedup']:.2f}x |")
    (args.out / "train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
