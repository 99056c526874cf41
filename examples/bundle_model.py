"""Make a trained model file a bundled default model: fp16 weights, a version, under rs_engine/weights/NAME.

Usage (from the repository root):
    .venv/bin/python examples/bundle_model.py TRAINED.safetensors --version 0.2 [--name ssdd-ship]

The card (classes, bands, normalisation, provenance with the training command and the test metrics recorded by
``rs-train evaluate --record test``) is kept; only the version changes, and weights are stored as float16 (half
the size; :func:`rs_engine.checkpoint.load_model` casts them back to float32). Re-evaluate the bundled file by name
(``rs-train evaluate --model NAME ...``) to check that fp16 costs no accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rs_engine.checkpoint import load_model, save_model

WEIGHTS = Path(__file__).resolve().parents[1] / "rs_engine" / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="trained model file (rs-train train / finetune output)")
    ap.add_argument("--version", required=True, help="version written in the card, e.g. 0.2")
    ap.add_argument("--name", help="bundled name (default: the card's name)")
    args = ap.parse_args()
    model, card = load_model(str(args.model), device="cpu")
    card = dataclasses.replace(card, name=args.name or card.name, version=args.version)
    out = save_model(WEIGHTS / f"{card.name}.safetensors", model, card, half=True)
    print(f"{out}: {card.label}, {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
