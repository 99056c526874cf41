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


def _head_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    """``--head``: the instance mask head of the trained model (``ModelConfig.head``, recorded in its card)."""
    p.add_argument("--head", choices=["maskrcnn", "prompt"], default=default,
                   help="instance mask head: maskrcnn (FCN mask head on RoIAlign features) or prompt (RSPrompter-"
                        "anchor: a SAM-style prompt head prompted by the detected boxes, trained jointly on the "
                        "truth boxes, jittered)" + ("" if default else "; default: the base model's"))


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
    _head_arg(t, "maskrcnn")
    t.add_argument("--neck", choices=["fpn", "separable_fpn"], default="fpn",
                   help="fpn, or separable_fpn: the FPN outputs' and the RPN's 3x3 convolutions depthwise-separable "
                        "(with --init from a dense-neck model they are first fitted to its convolutions)")
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
    _head_arg(f, None)
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
    e.add_argument("--box-prompts", choices=["box_head", "truth"], help="with --coco: mean mask IoU of masks "
                   "prompted by the truth boxes instead of AP, the mask channel of the box head's class or the truth's")
    e.add_argument("--mask-head", choices=["maskrcnn", "prompt"], help="with --coco: masks of the detections from "
                   "the Mask R-CNN mask head or from the model's prompt head prompted by the detected boxes "
                   "(RSPrompter-anchor); default: the model's own (its card's head)")
    e.add_argument("--point-prompts", action="store_true", help="with --coco: mean mask IoU of masks prompted "
                   "by one point per object (the interior-most pixel of its truth mask) instead of AP")
    e.add_argument("--device", default="auto")
    e.add_argument("--max-images", type=int)
    e.add_argument("--input-scale", type=float, default=1.0, metavar="S", help="with --coco (AP): resize each image "
                   "by S before predicting (boxes and masks scored at its own size); default 1")
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
    ph = sub.add_parser("prompt-head", help="train a SAM-style prompt head on a model's frozen features")
    ph.add_argument("--model", required=True, help="bundled model name or model file; its weights stay as they are")
    ph.add_argument("--coco", required=True, type=Path, action="append", help="COCO instance JSON (repeatable)")
    ph.add_argument("--images", required=True, type=Path, action="append", help="image folder, one per --coco")
    ph.add_argument("--out", required=True, type=Path, help="output model file: the model plus its prompt head")
    ph.add_argument("--name", help="model name in the card (default: output file stem)")
    ph.add_argument("--chip-size", type=int, default=512)
    ph.add_argument("--chips-per-image", type=int, default=1)
    ph.add_argument("--objects", type=int, default=8, help="objects prompted per chip and step")
    _optim_args(ph, epochs=20, lr=2e-3, warmup=30, batch=2, supervised=False)
    ph.set_defaults(checkpoint_minutes=3.0)
    return p


def _distill_parser(sub: Any) -> None:
    from training.distill import SPEC_HELP

    q = sub.add_parser("quantize", help="write a model's int8 form for OpenVINO (NNCF post-training quantization)")
    q.add_argument("--model", required=True, help="bundled model name, or a .onnx with its .safetensors beside it")
    q.add_argument("--coco", type=Path, required=True, help="COCO annotation file of the calibration (training) images")
    q.add_argument("--images", type=Path, required=True, help="folder of the calibration images")
    q.add_argument("--out", type=Path, help="the .xml to write (default: NAME.int8.xml beside the .onnx)")
    q.add_argument("--tiles", type=int, default=64, help="calibration tiles (random windows of random images)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--progress", default="bar", choices=["bar", "jsonl", "none"])
    ds = sub.add_parser("distill", help="pretrain a backbone by distilling a teacher's features (RS4D, DRD)",
                        description="Distil a frozen teacher's feature maps into a student backbone on unlabelled "
                        "images. Teacher specs: " + SPEC_HELP + ".")
    ds.add_argument("--teacher", required=True, metavar="SPEC", help=SPEC_HELP)
    ds.add_argument("--images", required=True, type=Path, nargs="+", metavar="DIR",
                    help="folders (searched recursively) and raster files of unlabelled images")
    ds.add_argument("--student-config", default="ssm_tiny", help="student backbone name (ssm_tiny, heat_tiny...)")
    ds.add_argument("--init-student", choices=["imagenet"],
                    help="start an effnet_* / ssm_hybrid_* student from its ImageNet MBConv weights")
    ds.add_argument("--freeze-stages", type=int, default=0,
                    help="keep the student's stem and first N stages as initialised (with --init-student imagenet "
                         "and a hybrid, 2 trains only its SS2D stages)")
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


def _require_training_dependencies() -> None:
    """The light engine (``pip install delineate``) has no PyTorch: say what to install, in one line (exit 2)."""
    import importlib.util

    missing = [m for m in ("torch", "torchvision", "pycocotools", "geopandas") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"rs-train needs the full engine ({', '.join(missing)} not installed): "
                         "pip install 'delineate[train]', or Install engine > full in the QGIS plugin")


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
        _require_training_dependencies()
        from training import commands

        command = {"train": commands.run_train, "finetune": commands.run_finetune, "evaluate": commands.run_evaluate,
                   "pretrain": commands.run_pretrain, "distill": commands.run_distill,
                   "prompt-head": commands.run_prompt_head, "quantize": _quantize}[args.command]
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


def _quantize(args: argparse.Namespace, report: Any) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None:
        raise InputError("rs-train quantize needs NNCF and OpenVINO: pip install 'delineate[quantize]'")
    from training.quantize import quantize

    return quantize(args.model, args.coco, args.images, args.out, args.tiles, args.seed, args.overwrite)


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers LO,HI, e.g. 0.6,1.6") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < LO <= HI")
    return lo, hi


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
