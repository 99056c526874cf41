"""``rs-train``: train and evaluate models. Imports rs_engine; rs_engine never imports training.

Commands here: ``train`` (COCO dataset) and ``evaluate`` (COCO dataset). Fine-tuning on local annotations,
distillation and pretraining come with their issues. Exit codes as ``rs-engine``: 0, 1, 2 (bad input), 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rs_engine.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rs-train", description="Train and evaluate Delineate models.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a COCO instance dataset")
    t.add_argument("--coco", required=True, type=Path, help="COCO instance JSON of the training split")
    t.add_argument("--images", required=True, type=Path, help="folder the JSON's file names are relative to")
    t.add_argument("--val-coco", type=Path, help="COCO JSON of the validation split (mask AP picks the best)")
    t.add_argument("--val-images", type=Path)
    t.add_argument("--model-config", default="ssm_tiny", help="backbone name (ssm_tiny, ssm_small, ...)")
    t.add_argument("--out", required=True, type=Path, help="output model file (.safetensors)")
    t.add_argument("--name", help="model name in the card (default: output file stem)")
    t.add_argument("--bands", default="1,2,3", help="image bands to use, 1-based (e.g. 1 for SAR)")
    t.add_argument("--chip-size", type=int, default=512)
    t.add_argument("--chips-per-image", type=int, default=1)
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-steps", type=int, default=200)
    t.add_argument("--max-minutes", type=float, help="stop after this much training time")
    t.add_argument("--checkpoint-minutes", type=float, default=10.0)
    t.add_argument("--val-max-images", type=int, help="evaluate on the first N validation images only")
    t.add_argument("--gsd", type=float, help="training GSD in m/px for the model card")
    t.add_argument("--device", default="auto")
    t.add_argument("--workers", type=int, default=1)

    e = sub.add_parser("evaluate", help="COCO mask and box AP of a model on a COCO dataset")
    e.add_argument("--model", required=True, help="bundled model name or model file")
    e.add_argument("--coco", required=True, type=Path)
    e.add_argument("--images", required=True, type=Path)
    e.add_argument("--device", default="auto")
    e.add_argument("--max-images", type=int)
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.add_argument("--record", metavar="SPLIT", help="store the metrics in the model card's provenance under "
                   "metrics[SPLIT] (e.g. test); the model must be a file path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _train(args) if args.command == "train" else _evaluate(args)
    except InputError as exc:
        print(f"rs-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rs-train: cancelled (re-run the same command to resume)", file=sys.stderr)
        return 130


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _train(args: argparse.Namespace) -> int:
    import torch

    from rs_engine.checkpoint import ModelCard
    from rs_engine.models import ModelConfig, build_model
    from training.coco import ChipSpec, CocoChips, band_statistics
    from training.evaluate import evaluate_coco
    from training.train import TrainConfig, train

    bands = [int(b) - 1 for b in args.bands.split(",")]
    spec = ChipSpec(args.chip_size, bands, [0.0] * len(bands), [1.0] * len(bands))
    train_set = CocoChips(args.coco, args.images, spec, train=True, chips_per_image=args.chips_per_image)
    # Statistics of the raw images (band_statistics reads them unnormalised), then the chips use them.
    spec.mean, spec.std = mean, std = band_statistics(train_set)
    config = ModelConfig(backbone=args.model_config, in_channels=len(bands),
                         num_classes=len(train_set.class_names), tile_size=args.chip_size)
    torch.manual_seed(0)
    model = build_model(config)
    card = ModelCard(
        name=args.name or args.out.stem, version="0.1", architecture=config.to_dict(),
        class_names=train_set.class_names, bands=len(bands), mean=mean, std=std, gsd=args.gsd,
        tile_size=args.chip_size, overlap=args.chip_size // 4, score_threshold=0.5,
        provenance={"data": str(args.coco), "command": " ".join(sys.argv)},
    )
    evaluate = None
    if args.val_coco:
        val_set = CocoChips(args.val_coco, args.val_images or args.images, spec, train=False)
        device = _device(args.device)

        def evaluate(m):  # noqa: ANN001, ANN202
            return evaluate_coco(m, val_set, device=device, max_images=args.val_max_images)

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, max_minutes=args.max_minutes,
                      checkpoint_minutes=args.checkpoint_minutes, num_workers=args.workers)
    metrics = train(model, card, train_set, args.out, cfg, evaluate=evaluate, device=_device(args.device))
    print(json.dumps({"output": str(args.out), "metrics": metrics}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rs_engine.checkpoint import load_model
    from training.coco import ChipSpec, CocoChips
    from training.evaluate import evaluate_coco

    device = _device(args.device)
    model, card = load_model(args.model, device)
    bands = list(range(card.bands))
    ds = CocoChips(args.coco, args.images, ChipSpec(card.tile_size, bands, card.mean, card.std), train=False)
    metrics = evaluate_coco(model, ds, device=device, max_images=args.max_images)
    if args.record:
        from rs_engine.checkpoint import read_card, update_card

        card = read_card(args.model)
        card.provenance.setdefault("metrics", {})[args.record] = {
            **metrics, "data": str(args.coco), "command": " ".join(["rs-train", *sys.argv[1:]])}
        update_card(args.model, card)
    text = json.dumps(metrics, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
