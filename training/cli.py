"""``rs-train``: train, fine-tune and evaluate models. Imports rs_engine; rs_engine never imports training.

Commands: ``train`` (COCO dataset), ``finetune`` (rasters + a polygon layer: the analyst's own annotations),
``evaluate`` (COCO dataset, or rasters + polygons through the tiled ``rs-engine segment`` pipeline) and ``pretrain``
(a backbone from unlabelled images, :mod:`training.freqmask`) and ``distill`` (a backbone distilled from a teacher,
:mod:`training.distill`; ``--drd-teacher`` adds relation distillation to train / finetune). Exit codes as
``rs-engine``: 0, 1, 2 (bad input), 130 (cancelled; re-run the same command to resume). ``--progress jsonl`` writes
one JSON object per line on stdout: ``{"event": "progress", "epoch", "epochs", "done", "total", "loss"}``,
``{"event": "epoch", "epoch", "loss", "mask_ap", "box_ap", "minutes"}``, then ``{"event": "done", "output",
"metrics"}`` or ``{"event": "error", "message"}``. Under ``torchrun --nproc_per_node N`` training runs with
DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rs_engine.cli import UsageParser, parse_bands
from rs_engine.errors import InputError


def _optim_args(p: argparse.ArgumentParser, epochs: int, lr: float, warmup: int, batch: int,
                supervised: bool = True) -> None:
    """The optimisation options every training command shares; ``supervised`` adds those of train/finetune
    (freezing, early stopping, backbone initialisation, DRD as an extra loss)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=batch, help="chips per step (per process under torchrun)")
    g.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, default=warmup)
    g.add_argument("--max-minutes", type=float, help="stop after this much training time (re-run to continue)")
    g.add_argument("--checkpoint-minutes", type=float, default=10.0)
    g.add_argument("--workers", type=int, default=1, help="data-loading processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--progress", default="bar", choices=["bar", "jsonl", "none"])
    if not supervised:
        return
    g.add_argument("--freeze-backbone", action="store_true", help="train only the FPN and heads")
    g.add_argument("--freeze-stages", type=int, default=0, help="freeze the stem and the first N backbone stages")
    g.add_argument("--patience", type=int, help="stop after N evaluations without validation mask AP gain")
    g.add_argument("--init-backbone", metavar="BACKBONE.safetensors|imagenet",
                   help="initialise the backbone from a pretrained backbone file (rs-train distill / pretrain), or "
                        "'imagenet': the ImageNet weights of an effnet_* / ssm_hybrid_* body")
    g.add_argument("--drd-teacher", metavar="SPEC", help="add dual relation distillation (DRD) from this teacher "
                   "(a model name or file, or any rs-train distill --teacher spec)")
    g.add_argument("--drd-weight", type=float, default=1.0, help="weight of the DRD loss (with --drd-teacher)")


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="rs-train", description="Train, fine-tune and evaluate Delineate models.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, parser_class=UsageParser)

    t = sub.add_parser("train", help="train a model on a COCO instance dataset")
    t.add_argument("--coco", required=True, type=Path, help="COCO instance JSON of the training split")
    t.add_argument("--images", required=True, type=Path, help="folder the JSON's file names are relative to")
    t.add_argument("--val-coco", type=Path, help="COCO JSON of the validation split (mask AP picks the best)")
    t.add_argument("--val-images", type=Path, help="folder of the validation images (default: --images)")
    t.add_argument("--val-max-images", type=int, help="evaluate on the first N validation images only")
    t.add_argument("--model-config", default="ssm_tiny", help="backbone name (ssm_tiny, heat_tiny, resnet50...)")
    t.add_argument("--init", help="initialise from this model (name or file); layers that differ stay new")
    t.add_argument("--out", required=True, type=Path, help="output model file (.safetensors)")
    t.add_argument("--name", help="model name in the card (default: output file stem)")
    t.add_argument("--bands", default="1,2,3", type=parse_bands, help="image bands to use, 1-based (e.g. 1 for SAR)")
    t.add_argument("--chip-size", type=int, default=512)
    t.add_argument("--chips-per-image", type=int, default=1)
    t.add_argument("--gsd", type=float, help="training GSD in m/px for the model card")
    t.add_argument("--scale-range", type=_scale_range, default=(0.8, 1.25), metavar="LO,HI",
                   help="scale jitter: chips are zoomed by a log-uniform factor in [LO, HI] (default 0.8,1.25)")
    _optim_args(t, epochs=12, lr=1e-3, warmup=200, batch=4)

    f = sub.add_parser("finetune", help="fine-tune a model on rasters + a polygon layer (your own annotations)")
    f.add_argument("--raster", required=True, type=Path, action="append", help="raster file (repeatable)")
    f.add_argument("--labels", required=True, type=Path, help="polygon layer (GeoPackage, GeoJSON, Shapefile)")
    f.add_argument("--class-field", required=True, help="attribute holding each polygon's class")
    f.add_argument("--aoi", type=Path, help="polygons of the fully annotated area (default: around the labels)")
    f.add_argument("--base-model", default="nwpu10", help="bundled model name or model file to start from")
    f.add_argument("--out", required=True, type=Path, help="output model file (.safetensors)")
    f.add_argument("--name", help="model name in the card (default: output file stem)")
    f.add_argument("--bands", type=parse_bands, help="raster bands to feed the model, 1-based (repeats allowed)")
    f.add_argument("--chip-size", type=int, help="training chip size in px (default: the base model's tile)")
    f.add_argument("--chips-per-epoch", type=int, help="training chips per epoch (default: twice the chips that "
                   "tile the annotated area, at least 16)")
    f.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the annotated area held out for validation, split by blocks (0: none)")
    _optim_args(f, epochs=20, lr=3e-4, warmup=20, batch=2)

    e = sub.add_parser("evaluate", help="COCO mask and box AP of a model (COCO dataset or rasters + polygons)")
    e.add_argument("--model", required=True, help="bundled model name or model file")
    e.add_argument("--coco", type=Path, help="COCO JSON (with --images)")
    e.add_argument("--images", type=Path)
    e.add_argument("--raster", type=Path, action="append", help="raster file (repeatable; with --labels)")
    e.add_argument("--labels", type=Path, help="ground-truth polygon layer")
    e.add_argument("--class-field", help="attribute holding each polygon's class")
    e.add_argument("--aoi", type=Path, help="evaluate only inside these polygons")
    e.add_argument("--bands", type=parse_bands, help="raster bands to feed the model, 1-based")
    e.add_argument("--class-agnostic", action="store_true", help="score objects whatever their class")
    e.add_argument("--device", default="auto")
    e.add_argument("--max-images", type=int)
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.add_argument("--record", metavar="SPLIT", help="store the metrics in the model card's provenance under "
                   "metrics[SPLIT] (e.g. test); the model must be a file path")
    pt = sub.add_parser("pretrain", help="pretrain a backbone without labels (frequency-masked reconstruction)")
    pt.add_argument("--method", default="freq-mask", choices=["freq-mask"],
                    help="freq-mask: RS-vHeat-style DCT band masking, pixel + frequency reconstruction")
    pt.add_argument("--images", required=True, type=Path, nargs="+", metavar="DIR",
                    help="folders (searched recursively) and raster files of unlabelled images")
    pt.add_argument("--backbone", default="heat_tiny", help="backbone name (heat_tiny, ssm_tiny...)")
    pt.add_argument("--out", required=True, type=Path, help="output backbone file (.safetensors), for --init-backbone")
    pt.add_argument("--bands", default="1,2,3", type=parse_bands, help="image bands to use, 1-based (e.g. 1 for SAR)")
    pt.add_argument("--chip-size", type=int, default=256)
    pt.add_argument("--chips-per-image", type=int, default=1)
    _optim_args(pt, epochs=10, lr=1.5e-3, warmup=50, batch=8, supervised=False)
    _distill_parser(sub)
    return p


def _distill_parser(sub: Any) -> None:
    from training.distill import SPEC_HELP

    ds = sub.add_parser("distill", help="pretrain a backbone by distilling a teacher's features (RS4D, DRD)",
                        description="Distil a frozen teacher's feature maps into a student backbone on unlabelled "
                        "images. Teacher specs: " + SPEC_HELP + ".")
    ds.add_argument("--teacher", required=True, metavar="SPEC", help=SPEC_HELP)
    ds.add_argument("--images", required=True, type=Path, nargs="+", metavar="DIR",
                    help="folders (searched recursively) and raster files of unlabelled images")
    ds.add_argument("--student-config", default="ssm_tiny", help="student backbone name (ssm_tiny, heat_tiny...)")
    ds.add_argument("--init-student", choices=["imagenet"],
                    help="start an effnet_* / ssm_hybrid_* student from its ImageNet MBConv weights")
    ds.add_argument("--out", required=True, type=Path, help="output backbone file (.safetensors), for --init-backbone")
    ds.add_argument("--bands", default="1,2,3", type=parse_bands, help="image bands to use, 1-based")
    ds.add_argument("--chip-size", type=int, default=256)
    ds.add_argument("--chips-per-image", type=int, default=1)
    ds.add_argument("--cache-dir", type=Path, help="keep the teacher's features here (it then runs once per chip)")
    ds.add_argument("--perturb", default="adaptive", choices=["none", "fixed", "adaptive"],
                    help="student input noise + patch masking: none, fixed, or adaptive per chip (default)")
    ds.add_argument("--noise", type=float, default=0.2, help="base noise std (normalised units)")
    ds.add_argument("--mask-ratio", type=float, default=0.2, help="base share of masked patches")
    ds.add_argument("--noise-max", type=float, default=0.6, help="adaptive: largest noise std")
    ds.add_argument("--mask-max", type=float, default=0.6, help="adaptive: largest mask ratio")
    ds.add_argument("--mask-patch", type=int, default=32, help="masked patch side in px")
    ds.add_argument("--drd-weight", type=float, default=0.0, help="weight of the dual relation (DRD) loss; 0: off")
    _optim_args(ds, epochs=10, lr=1e-3, warmup=50, batch=8, supervised=False)


class _Reporter:
    """Progress and errors as a tqdm bar (stderr), JSON lines (stdout) or nothing."""

    def __init__(self, mode: str) -> None:
        self.mode, self.bar, self.epoch = mode, None, None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "jsonl":
            print(json.dumps(event), flush=True)
        elif self.mode == "bar":
            if event["event"] == "progress":
                if self.bar is None or self.epoch != event["epoch"]:
                    from tqdm import tqdm

                    self.close()
                    self.epoch = event["epoch"]
                    self.bar = tqdm(total=event["total"], initial=event["done"] - 1, unit="step", file=sys.stderr,
                                    desc=f"epoch {event['epoch']}/{event['epochs']}")
                self.bar.update(1)
                self.bar.set_postfix(loss=event["loss"], refresh=False)
            elif event["event"] == "epoch" and event.get("mask_ap") is not None:
                self.close()
                print(f"epoch {event['epoch']}: loss {event['loss']}, validation mask AP {event['mask_ap']}, "
                      f"box AP {event['box_ap']}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def error(self, message: str) -> None:
        self.close()
        if self.mode == "jsonl":
            print(json.dumps({"event": "error", "message": message}), flush=True)
        print(f"rs-train: error: {message}", file=sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "jsonl" if "--progress=jsonl" in argv or any(
        a == "--progress" and b == "jsonl" for a, b in zip(argv, argv[1:])) else "bar"
    report = _Reporter(mode)
    # SIGTERM (the QGIS plugin's Cancel, a batch scheduler) ends like Ctrl-C: checkpoint kept, exit 130.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        report.mode = getattr(args, "progress", mode)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        command = {"train": _train, "finetune": _finetune, "evaluate": _evaluate,
                   "pretrain": _pretrain, "distill": _distill}[args.command]
        result = command(args, report)
    except InputError as exc:
        report.error(str(exc))
        return 2
    except KeyboardInterrupt:
        report.close()
        if mode == "jsonl":
            print(json.dumps({"event": "cancelled"}), flush=True)
        print("rs-train: cancelled (re-run the same command to resume)", file=sys.stderr)
        return 130
    report.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"event": "done", **result}) if report.mode == "jsonl" else json.dumps(result, indent=1),
              flush=True)
    return 0


def _device(name: str) -> str:
    from rs_engine.device import resolve_device

    return str(resolve_device(name))


def _train_config(args: argparse.Namespace):  # noqa: ANN202
    """The optimisation settings of any training command; freezing and early stopping only where it has them
    (``train``, ``finetune``; not the label-free ``pretrain`` and ``distill``)."""
    from training.train import TrainConfig

    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       max_minutes=args.max_minutes, checkpoint_minutes=args.checkpoint_minutes,
                       num_workers=args.workers, freeze_backbone=getattr(args, "freeze_backbone", False),
                       freeze_stages=getattr(args, "freeze_stages", 0), patience=getattr(args, "patience", None),
                       seed=args.seed)


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers LO,HI, e.g. 0.6,1.6") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < LO <= HI")
    return lo, hi


def portable(path: str | Path) -> str:
    """A path as a model card records it: relative to the project (``examples/...``) or to its data
    (``../shared/...``); any other path by its file name only, so no card holds a path of the training machine."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():
        return str(path)
    root = Path(__file__).resolve().parents[1]
    p = p.resolve()
    for base, prefix in ((root, ""), (root.parent / "shared", "../shared/")):
        if p.is_relative_to(base):
            return prefix + str(p.relative_to(base))
    return p.name


def _command() -> str:
    """The command line as run, with paths made :func:`portable`."""
    words = ["rs-train"]
    for word in sys.argv[1:]:
        looks_like_path = "/" in word and not word.startswith("-") and ":" not in word
        words.append(portable(word) if looks_like_path else word)
    return " ".join(words)


def _train(args: argparse.Namespace, report: _Reporter) -> dict[str, Any]:
    import torch

    from rs_engine.checkpoint import ModelCard
    from rs_engine.models import ModelConfig, build_model
    from training.augment import AugmentConfig
    from training.coco import ChipSpec, CocoChips, band_statistics
    from training.evaluate import evaluate_coco
    from training.pretrain import init_backbone
    from training.train import init_from, train

    bands = [b - 1 for b in args.bands]
    spec = ChipSpec(args.chip_size, bands, [0.0] * len(bands), [1.0] * len(bands))
    train_set = CocoChips(args.coco, args.images, spec, train=True, chips_per_image=args.chips_per_image,
                          seed=args.seed, augment=AugmentConfig(scale_range=args.scale_range))
    # Statistics of the raw images (band_statistics reads them unnormalised), then the chips use them.
    spec.mean, spec.std = mean, std = band_statistics(train_set)
    config = ModelConfig(backbone=args.model_config, in_channels=len(bands),
                         num_classes=len(train_set.class_names), tile_size=args.chip_size)
    torch.manual_seed(args.seed)
    model = build_model(config)
    provenance: dict[str, Any] = {"data": portable(args.coco), "command": _command()}
    if args.init:
        provenance["init"] = init_from(model, args.init)
    if args.init_backbone:
        provenance["init_backbone"] = init_backbone(model, args.init_backbone, args.model_config, mean, std)
    card = ModelCard(
        name=args.name or args.out.stem, version="0.1", architecture=config.to_dict(),
        class_names=train_set.class_names, bands=len(bands), mean=mean, std=std, gsd=args.gsd,
        tile_size=args.chip_size, overlap=args.chip_size // 4, score_threshold=0.5, provenance=provenance,
    )
    evaluate = None
    device = _device(args.device)
    if args.val_coco:
        val_set = CocoChips(args.val_coco, args.val_images or args.images, spec, train=False)

        def evaluate(m):  # noqa: ANN001, ANN202
            return evaluate_coco(m, val_set, device=device, max_images=args.val_max_images)

    metrics = train(model, card, train_set, args.out, _train_config(args), evaluate=evaluate, device=device,
                    progress=report, extra_loss=_drd_extra(args, model, card))
    return {"output": str(args.out), "metrics": metrics}


def _finetune(args: argparse.Namespace, report: _Reporter) -> dict[str, Any]:
    import torch

    from rs_engine.checkpoint import ModelCard, read_card
    from rs_engine.models import ModelConfig, build_model
    from training.coco import ChipSpec
    from training.evaluate import evaluate_chips
    from training.local import LocalChips
    from training.pretrain import init_backbone
    from training.train import init_from, train

    base = read_card(args.base_model)
    bands = _raster_bands(args.raster, base.bands, args.bands)
    size = args.chip_size or base.tile_size
    if not 0 <= args.val_fraction < 1:
        raise InputError(f"--val-fraction {args.val_fraction}: use a value in [0, 1)")
    spec = ChipSpec(size, [b - 1 for b in bands], [0.0] * len(bands), [1.0] * len(bands))
    common = dict(rasters=args.raster, labels=args.labels, class_field=args.class_field, spec=spec, aoi=args.aoi,
                  val_fraction=args.val_fraction, seed=args.seed, bands=bands)
    train_set = LocalChips(**common, split="train" if args.val_fraction > 0 else "all", train=True,
                           chips_per_epoch=args.chips_per_epoch)
    # New sensor, new radiometry: normalise with the statistics of the analyst's rasters, not the base model's.
    spec.mean, spec.std = mean, std = train_set.band_statistics()
    config = ModelConfig(**{**base.architecture, "num_classes": len(train_set.class_names), "tile_size": size,
                            "in_channels": len(bands)})
    torch.manual_seed(args.seed)
    model = build_model(config)
    init = init_from(model, args.base_model, same_classes=base.class_names == train_set.class_names)
    if args.init_backbone:
        init["backbone"] = init_backbone(model, args.init_backbone, config.backbone, mean, std)
    card = ModelCard(
        name=args.name or args.out.stem, version="0.1", architecture=config.to_dict(),
        class_names=train_set.class_names, bands=len(bands), mean=mean, std=std,
        gsd=_raster_gsd(args.raster[0]) or base.gsd, tile_size=size, overlap=size // 4,
        score_threshold=base.score_threshold,
        provenance={"data": {"rasters": [portable(r) for r in args.raster], "labels": portable(args.labels),
                             "class_field": args.class_field, "aoi": str(args.aoi) if args.aoi else None},
                    "base_model": base.label, "init": init, "command": _command()},
    )
    evaluate = None
    device = _device(args.device)
    if args.val_fraction > 0:
        val_set = LocalChips(**common, class_names=train_set.class_names, split="val", train=False)

        def evaluate(m):  # noqa: ANN001, ANN202
            return evaluate_chips(m, val_set, train_set.class_names, device=device)

    metrics = train(model, card, train_set, args.out, _train_config(args), evaluate=evaluate, device=device,
                    progress=report, extra_loss=_drd_extra(args, model, card))
    return {"output": str(args.out), "classes": train_set.class_names, "metrics": metrics}


def _drd_extra(args: argparse.Namespace, model: Any, card: Any) -> Any:
    """The ``--drd-teacher`` extra loss of train / finetune, or None."""
    if not args.drd_teacher:
        return None
    if args.drd_weight <= 0:
        raise InputError("--drd-weight must be > 0")
    from training.distill.objective import DRDExtraLoss
    from training.distill.teachers import build_teacher

    card.provenance["drd"] = {"teacher": args.drd_teacher, "weight": args.drd_weight}
    return DRDExtraLoss(model, build_teacher(args.drd_teacher), card.mean, card.std, args.drd_weight)


def _raster_bands(rasters: Sequence[Path], model_bands: int, bands: list[int] | None) -> list[int]:
    """1-based raster bands the fine-tuned model takes: ``bands`` when given (checked against every raster), else
    the first ``model_bands`` bands, or all of them when a raster has fewer (the model's input conv is adapted, see
    :func:`training.train.adapt_input_conv`), so the new model reads the analyst's rasters as they are."""
    from rs_engine.raster import open_raster

    counts = []
    for r in rasters:
        with open_raster(r) as ds:
            counts.append(ds.count)
    n = min(counts)
    if bands is not None:
        if max(bands) > n:
            raise InputError(f"--bands: {rasters[counts.index(n)]} has {n} band(s), no band {max(bands)}")
        return bands
    return list(range(1, min(n, model_bands) + 1))


def _raster_gsd(raster: Path) -> float | None:
    """Mean pixel size in metres of a raster (None without georeferencing), for the fine-tuned model's card."""
    from rs_engine.raster import open_raster, pixel_size_m

    with open_raster(raster) as ds:
        size = pixel_size_m(ds.crs, ds.transform, ds.width, ds.height)
    return round((size[0] + size[1]) / 2, 4) if size else None


def _evaluate(args: argparse.Namespace, report: _Reporter) -> dict[str, Any]:
    from rs_engine.checkpoint import load_model, read_card, update_card

    device = _device(args.device)
    if args.coco:
        if not args.images:
            raise InputError("--coco needs --images, the folder of its images")
        from training.coco import ChipSpec, CocoChips
        from training.evaluate import evaluate_coco

        model, card = load_model(args.model, device)
        bands = list(range(card.bands))
        ds = CocoChips(args.coco, args.images, ChipSpec(card.tile_size, bands, card.mean, card.std), train=False)
        metrics = evaluate_coco(model, ds, device=device, max_images=args.max_images)
        data: Any = portable(args.coco)
    elif args.raster and args.labels:
        if not args.class_field:
            raise InputError("--labels needs --class-field, the attribute holding each polygon's class")
        from training.evaluate import evaluate_raster

        metrics = evaluate_raster(args.model, args.raster, args.labels, args.class_field, aoi=args.aoi,
                                  device=device, bands=args.bands, class_agnostic=args.class_agnostic)
        data = {"rasters": [portable(r) for r in args.raster], "labels": portable(args.labels),
                "aoi": str(args.aoi) if args.aoi else None, "class_agnostic": args.class_agnostic}
    else:
        raise InputError("evaluate needs --coco ANN.json --images DIR, or --raster R.tif --labels L.gpkg "
                         "--class-field F")
    if args.record:
        card = read_card(args.model)
        card.provenance.setdefault("metrics", {})[args.record] = {**metrics, "data": data, "command": _command()}
        update_card(args.model, card)
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1))
    return metrics


def _pretrain(args: argparse.Namespace, report: _Reporter) -> dict[str, Any]:
    import torch

    from rs_engine.models import BACKBONES, ModelConfig, build_backbone
    from training.freqmask import FreqMaskObjective
    from training.pretrain import UnlabelledChips, run_pretraining, save_backbone, train_config_dict

    if args.backbone not in BACKBONES:
        raise InputError(f"--backbone {args.backbone}: unknown (known: {', '.join(BACKBONES)})")
    cfg = _train_config(args)
    device = _device(args.device)
    data = UnlabelledChips(args.images, size=args.chip_size, bands=args.bands,
                           chips_per_image=args.chips_per_image, seed=args.seed)
    torch.manual_seed(args.seed)
    body = build_backbone(ModelConfig(backbone=args.backbone, in_channels=len(args.bands), tile_size=args.chip_size))
    # Each DDP rank draws its own masks; the weights start equal (same seed) and DDP keeps them so.
    objective = FreqMaskObjective(body, len(args.bands), seed=args.seed * 1000 + int(os.environ.get("RANK", "0")))
    provenance = {"data": [str(p) for p in args.images], "images": len(data.files), "chips": len(data),
                  "chip_size": args.chip_size, "train_config": train_config_dict(cfg), "command": _command()}

    def save(out: Path, obj: torch.nn.Module, state: dict[str, Any]) -> None:
        save_backbone(out, obj.backbone, backbone=args.backbone, in_channels=len(args.bands), method=args.method,
                      mean=data.mean.tolist(), std=data.std.tolist(),
                      provenance={**provenance, "epochs": state["epoch"], "steps": state["step"],
                                  "train_minutes": round(state["seconds"] / 60, 1), "last": state["last"]})

    if not args.out.parent.is_dir():
        raise InputError(f"{args.out}: its folder does not exist")
    metrics = run_pretraining(objective, data, args.out, cfg, save, device=device, progress=report)
    return {"output": str(args.out), "metrics": metrics}


def _distill(args: argparse.Namespace, report: _Reporter) -> dict[str, Any]:
    import torch

    from rs_engine.models import BACKBONES, ModelConfig, build_backbone
    from training.distill.losses import PerturbConfig
    from training.distill.objective import DistillObjective, cache_key
    from training.distill.teachers import build_teacher
    from training.pretrain import UnlabelledChips, run_pretraining, save_backbone, train_config_dict

    if args.student_config not in BACKBONES:
        raise InputError(f"--student-config {args.student_config}: unknown (known: {', '.join(BACKBONES)})")
    cfg = _train_config(args)
    if args.drd_weight < 0:
        raise InputError("--drd-weight must be >= 0")
    if not args.out.parent.is_dir():
        raise InputError(f"{args.out}: its folder does not exist")
    device = _device(args.device)
    perturb = PerturbConfig(mode=args.perturb, sigma=args.noise, mask_ratio=args.mask_ratio,
                            sigma_max=max(args.noise_max, args.noise), mask_max=max(args.mask_max, args.mask_ratio),
                            patch=args.mask_patch)
    data = UnlabelledChips(args.images, size=args.chip_size, bands=args.bands,
                           chips_per_image=args.chips_per_image, seed=args.seed)
    teacher = build_teacher(args.teacher)
    torch.manual_seed(args.seed)  # equal initial weights on every DDP rank
    body = build_backbone(ModelConfig(backbone=args.student_config, in_channels=len(args.bands),
                                      tile_size=args.chip_size))
    init = _init_student(body, args, data.mean.tolist(), data.std.tolist())
    cache = args.cache_dir / cache_key(args.teacher, data) if args.cache_dir else None
    objective = DistillObjective(body, teacher, data.mean.tolist(), data.std.tolist(), len(data), perturb,
                                 drd_weight=args.drd_weight, cache_dir=cache)
    torch.manual_seed(args.seed * 1000 + int(os.environ.get("RANK", "0")))  # each rank its own noise and masks
    provenance = {"teacher": args.teacher, "teacher_features": teacher.describe(), "pairs": objective.pairs,
                  "perturb": vars(perturb), "drd_weight": args.drd_weight, "init_student": init,
                  "data": [str(p) for p in args.images], "images": len(data.files), "chips": len(data),
                  "chip_size": args.chip_size, "train_config": train_config_dict(cfg), "command": _command()}

    def save(out: Path, obj: torch.nn.Module, state: dict[str, Any]) -> None:
        save_backbone(out, obj.student, backbone=args.student_config, in_channels=len(args.bands), method="distill",
                      mean=data.mean.tolist(), std=data.std.tolist(),
                      provenance={**provenance, "epochs": state["epoch"], "steps": state["step"],
                                  "train_minutes": round(state["seconds"] / 60, 1), "last": state["last"]})

    metrics = run_pretraining(objective, data, args.out, cfg, save, device=device, progress=report)
    return {"output": str(args.out), "metrics": metrics}


def _init_student(body: Any, args: argparse.Namespace, mean: list[float], std: list[float]) -> dict | None:
    """``--init-student imagenet``: the ImageNet weights of a hybrid or EfficientNet-Lite student's MBConv stages,
    the chips' band statistics folded into its stem (as ``rs-train train --init-backbone imagenet`` does)."""
    if not args.init_student:
        return None
    from rs_engine.models.effnet import EffNetBackbone, load_imagenet

    if not isinstance(body, EffNetBackbone):
        raise InputError(f"--init-student imagenet: {args.student_config} has no ImageNet weights "
                         "(effnet_lite0/1/2 and ssm_hybrid_* do)")  # fmt: skip
    n = load_imagenet(body, mean, std)
    return {"source": f"ImageNet EfficientNet-{body.cfg.variant.capitalize()}", "copied": n}


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
