"""Peers through the engine's own tiling: the practitioner's fast CPU choice, Ultralytics YOLO11n-seg (issue 14).

``python bench/peers.py yolo11n-seg RASTER -o OUT.gpkg [--tile-size 512] [--overlap 128] [--threads N]`` runs
:func:`rs_engine.segment` with the same tile plan, reading, merging and GeoPackage writing as ``rs-engine
segment``, the network swapped for YOLO11n-seg: built from Ultralytics' model yaml (``yolo11n-seg.yaml``, 2.9 M
parameters, 10 classes as NWPU VHR-10), untrained (no weights can be downloaded here; for timing the architecture
is what counts), run per tile as Ultralytics' own predictor does (letterbox-free: tiles are already square and a
multiple of 32), NMS (``ultralytics.utils.nms.non_max_suppression``) and prototype masks
(``ultralytics.utils.ops.process_mask``, upsampled to the tile). Prints the ``done`` JSON line ``rs-engine segment
--progress jsonl`` prints, so ``bench/end_to_end.py`` times it as it times the engine.

An untrained YOLO head scores every anchor near its prior (Ultralytics initialises the class bias to ~0.01), so it
keeps no detection at the default model's score threshold and pastes no mask: its time is the network, NMS and the
pipeline around them, a lower bound of a trained one's (which also builds masks for what it finds).

Needs the bench extra: ``uv pip install -e '.[bench]'`` (``make bench`` does it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEERS = ("yolo11n-seg",)


class YoloSegPredictor:
    """YOLO11n-seg as an engine predictor: (C, T, T) arrays in, ``boxes``, ``labels`` (1-based), ``scores``,
    ``masks`` (K, 1, T, T) out, the contract of :mod:`rs_engine.runtime`."""

    runtime = "torch"

    def __init__(self, num_classes: int, score_threshold: float = 0.25, iou: float = 0.7, max_det: int = 300):
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import SegmentationModel

        self.net = SegmentationModel("yolo11n-seg.yaml", nc=num_classes, verbose=False).eval()
        self.nc, self.conf, self.iou, self.max_det = num_classes, score_threshold, iou, max_det

    def set_score_threshold(self, threshold: float) -> None:
        self.conf = max(self.conf, threshold)

    def __call__(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        import torch
        from ultralytics.utils import ops
        from ultralytics.utils.nms import non_max_suppression

        out = []
        with torch.inference_mode():
            for image in images:
                x = torch.from_numpy(np.ascontiguousarray(image[:3]))[None]
                preds, proto = self.net(x)[0]
                det = non_max_suppression(preds, self.conf, self.iou, max_det=self.max_det, nc=self.nc)[0]
                size = tuple(image.shape[-2:])
                if len(det):
                    masks = ops.process_mask(proto[0], det[:, 6:], det[:, :4], size, upsample=True).float()
                else:
                    masks = torch.zeros(0, *size)
                out.append({"boxes": det[:, :4].numpy(), "scores": det[:, 4].numpy(),
                            "labels": det[:, 5].long().numpy() + 1, "masks": masks[:, None].numpy()})
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peer", choices=PEERS)
    ap.add_argument("raster", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--like", default="nwpu10", help="model whose card (bands, normalisation, threshold) is used")
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rs_engine import SegmentOptions, segment
    from rs_engine.card import read_card

    card = read_card(args.like)
    predictor = YoloSegPredictor(len(card.class_names), card.score_threshold)
    result = segment([args.raster], args.output, SegmentOptions(tile_size=args.tile_size, overlap=args.overlap,
                                                                overwrite=True), predictor=predictor, card=card)
    print(json.dumps({"event": "done", "output": str(result.output), "features": result.features}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
