"""Where a model's arithmetic goes on one tile: GFLOPs of the body, the FPN and the rest (RPN, RoI heads, paste).

    .venv/bin/python bench/flops.py [--model nwpu10] [--tile-size 512]

The body is counted by :func:`rs_engine.models.build.count_flops` (selective scans from their analytic cost,
which the FLOP counter does not see); the FPN and the whole model by ``torch.utils.flop_counter`` (a multiply-add
is 2 FLOPs) on a random tile in eval mode. The RoI heads' share depends on the detections, so it is that of a
random tile: a lower bound for a dense scene.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rs_engine.checkpoint import load_model
    from rs_engine.models.build import count_flops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nwpu10")
    ap.add_argument("--tile-size", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, card = load_model(args.model, "cpu")
    model.eval()
    size = args.tile_size or card.tile_size
    x = torch.rand(card.bands, size, size)

    def gflops(fn) -> float:  # noqa: ANN001
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    body = count_flops(model, size, card.bands)
    with torch.no_grad():
        feats = model.backbone.body(x[None])  # the FPN's input
    rec = {"model": args.model, "tile_size": size, "body": round(body["backbone_gflops"], 2),
           "scans_in_body": round(body["scan_gflops"], 2), "fpn": round(gflops(lambda: model.backbone.fpn(feats)), 2),
           "whole": round(gflops(lambda: model([x])) + body["scan_gflops"], 2)}
    rec["rpn_and_heads"] = round(rec["whole"] - rec["body"] - rec["fpn"], 2)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
