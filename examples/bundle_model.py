"""Make a trained model file a bundled default model: fp16 weights, a version, under rs_engine/weights/NAME, in
both forms: NAME.safetensors (PyTorch, training) and NAME.onnx (the light engine, ``rs-engine export``).

Usage (from the repository root):
    .venv/bin/python examples/bundle_model.py TRAINED.safetensors --version 0.2 [--name ssdd-ship]

The card (classes, bands, normalisation, provenance with the training command and the test metrics recorded by
``rs-train evaluate --record test``) is kept; only the version changes, and weights are stored as float16 (half
the size; :func:`rs_engine.checkpoint.load_model` casts them back to float32). Re-evaluate the bundled file by name
(``rs-train evaluate --model NAME ...``) to check that fp16 costs no accuracy.

Paths in the card's provenance (commands, data) are made portable: relative to the project or to ``../shared``,
other absolute paths by file name only, so no bundled card names a folder of the machine it was trained on.
``--card-only NAME`` does just that to an already bundled model, its weights untouched.

Then make its int8 form again (OpenVINO's default where valid; a file quantized from the old weights is skipped):
``rs-train quantize --model NAME --coco TRAIN.json --images IMAGES --overwrite`` (docs/benchmarks.md 2g).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

from rs_engine.checkpoint import bundled_models, load_model, read_card, save_model, update_card
from rs_engine.export import export_onnx
from training.commands import portable

WEIGHTS = Path(__file__).resolve().parents[1] / "rs_engine" / "weights"


def portable_provenance(value: Any) -> Any:
    """``value`` (the card's provenance: dicts, lists, strings) with every absolute path made :func:`portable`."""
    if isinstance(value, dict):
        return {k: portable_provenance(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_provenance(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"(?<![\w.])/[^\s\"',;]+", lambda m: portable(m.group(0)), value)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, help="trained model file (rs-train train / finetune output)")
    ap.add_argument("--version", help="version written in the card, e.g. 0.2")
    ap.add_argument("--name", help="bundled name (default: the card's name)")
    ap.add_argument("--card-only", metavar="NAME", help="only make the paths of bundled model NAME's card portable")
    args = ap.parse_args()
    if args.card_only:
        card = read_card(args.card_only)
        path = update_card(bundled_models()[args.card_only],
                           dataclasses.replace(card, provenance=portable_provenance(card.provenance)))
        print(f"{path}: card paths made portable")
        _export(path)
        return
    if args.model is None or args.version is None:
        ap.error("give MODEL and --version (or --card-only NAME)")
    model, card = load_model(str(args.model), device="cpu")
    card = dataclasses.replace(card, name=args.name or card.name, version=args.version,
                               provenance=portable_provenance(card.provenance))
    out = save_model(WEIGHTS / f"{card.name}.safetensors", model, card, half=True)
    print(f"{out}: {card.label}, {out.stat().st_size / 2**20:.1f} MiB")
    _export(out)


def _export(path: Path) -> None:
    """The ONNX form beside the .safetensors one, with the same card (the light engine's bundled model)."""
    onnx = export_onnx(path, path.with_suffix(".onnx"), overwrite=True)
    print(f"{onnx}: {onnx.stat().st_size / 2**20:.1f} MiB")
    if path.with_suffix(".int8.xml").exists():
        print(f"{path.with_suffix('.int8.xml').name} was quantized from the old weights: run rs-train quantize again")


if __name__ == "__main__":
    main()
