"""What the ``rs-train`` commands do, given their parsed arguments: datasets, models, cards and configs.

:mod:`training.cli` only parses; each ``run_*`` here builds the data, the network and its model card (with
provenance whose paths are :func:`portable`), then hands over to the one training loop (:mod:`training.loop`
through :func:`training.train.train` or :func:`training.pretrain.run_pretraining`). ``pretrain`` and ``distill``
share one path (:func:`_label_free`) and differ only in their objective.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rs_engine.errors import InputError

log = logging.getLogger(__name__)


def device(name: str) -> str:
    from rs_engine.device import resolve_device

    return str(resolve_device(name))


def train_config(args: argparse.Namespace):  # noqa: ANN202
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


def command_line() -> str:
    """The command line as run, with paths made :func:`portable`."""
    words = ["rs-train"]
    for word in sys.argv[1:]:
        looks_like_path = "/" in word and not word.startswith("-") and ":" not in word
        words.append(portable(word) if looks_like_path else word)
    return " ".join(words)


def run_train(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
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
                         num_classes=len(train_set.class_names), tile_size=args.chip_size, head=args.head,
                         neck=args.neck)
    torch.manual_seed(args.seed)
    model = build_model(config)
    _record_prompt_head(config, model)
    provenance: dict[str, Any] = {"data": portable(args.coco), "command": command_line()}
    if args.init:
        provenance["init"] = init_from(model, args.init)
        factorised = [k for k in provenance["init"]["adapted"] if ".layer_blocks." in k or "rpn.head.conv" in k]
        if config.neck == "separable_fpn" and factorised:  # from a dense neck: fit the separable convs to it
            from training.neck import fit_separable_neck

            provenance["init"]["separable_fit"] = fit_separable_neck(model, args.init, train_set)
    if args.init_backbone:
        provenance["init_backbone"] = init_backbone(model, args.init_backbone, args.model_config, mean, std)
    card = ModelCard(
        name=args.name or args.out.stem, version="0.1", architecture=config.to_dict(),
        class_names=train_set.class_names, bands=len(bands), mean=mean, std=std, gsd=args.gsd,
        tile_size=args.chip_size, overlap=args.chip_size // 4, score_threshold=0.5, provenance=provenance,
    )
    evaluate = None
    dev = device(args.device)
    if args.val_coco:
        val_set = CocoChips(args.val_coco, args.val_images or args.images, spec, train=False)

        def evaluate(m):  # noqa: ANN001, ANN202
            return evaluate_coco(m, val_set, device=dev, max_images=args.val_max_images)

    metrics = train(model, card, train_set, args.out, train_config(args), evaluate=evaluate, device=dev,
                    progress=report, extra_loss=_drd_extra(args, model, card))
    return {"output": str(args.out), "metrics": metrics}


def run_finetune(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
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
                            "in_channels": len(bands), "head": args.head or base.architecture.get("head", "maskrcnn")})
    prompt_head = config.extra.pop("prompt_head", None)
    if config.head == "prompt" and prompt_head is not None:
        config.extra["prompt_head"] = prompt_head  # trained on with the model: the base's head is a start
    elif prompt_head is not None:  # trained on the base's features, stale on the new ones
        log.warning("%s has a prompt head; it is not carried over (retrain one with rs-train prompt-head)",
                    base.label)
    torch.manual_seed(args.seed)
    model = build_model(config)
    _record_prompt_head(config, model)
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
                    "base_model": base.label, "init": init, "command": command_line()},
    )
    evaluate = None
    dev = device(args.device)
    if args.val_fraction > 0:
        val_set = LocalChips(**common, class_names=train_set.class_names, split="val", train=False)

        def evaluate(m):  # noqa: ANN001, ANN202
            return evaluate_chips(m, val_set, train_set.class_names, device=dev)

    metrics = train(model, card, train_set, args.out, train_config(args), evaluate=evaluate, device=dev,
                    progress=report, extra_loss=_drd_extra(args, model, card))
    return {"output": str(args.out), "classes": train_set.class_names, "metrics": metrics}


def _record_prompt_head(config: Any, model: Any) -> None:
    """A ``head = "prompt"`` model's card names its prompt head's sizes (build_model took the default ones)."""
    if config.head == "prompt":
        config.extra["prompt_head"] = model.prompt_head.config.to_dict()


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
    """Mean pixel size in metres of a raster (None without georeferencing), for the fine-tuned model's card, in
    the frame inference reads it in (:func:`rs_engine.raster.georeference`: a GCP-only scene has one too)."""
    from rs_engine.raster import georeference, open_raster, pixel_size_m

    with open_raster(raster) as ds:
        transform, crs = georeference(ds)
        size = pixel_size_m(crs, transform, ds.width, ds.height)
    return round((size[0] + size[1]) / 2, 4) if size else None


def run_evaluate(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
    from rs_engine.checkpoint import load_model, read_card, update_card

    dev = device(args.device)
    if args.coco:
        if not args.images:
            raise InputError("--coco needs --images, the folder of its images")
        from training.coco import ChipSpec, CocoChips
        from training.evaluate import evaluate_coco

        model, card = load_model(args.model, dev)
        bands = list(range(card.bands))
        ds = CocoChips(args.coco, args.images, ChipSpec(card.tile_size, bands, card.mean, card.std), train=False)
        if args.box_prompts and args.point_prompts:
            raise InputError("--box-prompts or --point-prompts, not both")
        if args.box_prompts:
            from training.prompted import evaluate_box_prompts

            metrics = evaluate_box_prompts(model, ds, dev, args.max_images, args.box_prompts)
        elif args.point_prompts:
            from training.prompted import evaluate_point_prompts

            metrics = evaluate_point_prompts(model, ds, dev, args.max_images)
        else:
            if not args.input_scale > 0:
                raise InputError(f"--input-scale {args.input_scale}: use a positive factor (1: images as they are)")
            own = card.architecture.get("head", "maskrcnn")  # load_model gives a prompt-head model wrapped already
            if args.mask_head == "maskrcnn" and own == "prompt":
                raise InputError(f"{args.model}: has no Mask R-CNN mask head (its masks come from its prompt head, "
                                 "head = prompt): leave out --mask-head")
            if args.mask_head == "prompt" and own != "prompt":
                if not hasattr(model, "prompt_head"):
                    raise InputError(f"{args.model}: has no prompt head (rs-train prompt-head trains one)")
                from rs_engine.models.prompter import PromptHeadInstances

                model = PromptHeadInstances(model)
            metrics = evaluate_coco(model, ds, device=dev, max_images=args.max_images, scale=args.input_scale)
        data: Any = portable(args.coco)
    elif args.box_prompts or args.point_prompts:
        raise InputError(f"--{'box' if args.box_prompts else 'point'}-prompts needs --coco ANN.json --images DIR")
    elif args.raster and args.labels:
        if not args.class_field:
            raise InputError("--labels needs --class-field, the attribute holding each polygon's class")
        from training.evaluate import evaluate_raster

        metrics = evaluate_raster(args.model, args.raster, args.labels, args.class_field, aoi=args.aoi,
                                  device=dev, bands=args.bands, class_agnostic=args.class_agnostic)
        data = {"rasters": [portable(r) for r in args.raster], "labels": portable(args.labels),
                "aoi": str(args.aoi) if args.aoi else None, "class_agnostic": args.class_agnostic}
    else:
        raise InputError("evaluate needs --coco ANN.json --images DIR, or --raster R.tif --labels L.gpkg "
                         "--class-field F")
    if args.record:
        card = read_card(args.model)
        other_head = args.mask_head == "prompt" and card.architecture.get("head") != "prompt"
        kind = ("-box-prompts" if args.box_prompts else "-point-prompts" if args.point_prompts
                else "-prompt-head" if other_head else "")
        kind += f"-x{args.input_scale:g}" if args.input_scale != 1 else ""
        split = f"{args.record}{kind}"  # never over the AP record
        card.provenance.setdefault("metrics", {})[split] = {**metrics, "data": data, "command": command_line()}
        update_card(args.model, card)
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1))
    return metrics


def run_prompt_head(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
    """``rs-train prompt-head``: a SAM-style prompt head trained on a frozen model (:mod:`training.prompt_head`)."""
    from training.prompt_head import run

    return run(args, report)


def run_pretrain(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
    """``rs-train pretrain``: frequency-masked reconstruction (:mod:`training.freqmask`) of a backbone."""
    from training.freqmask import FreqMaskObjective

    def objective(body: Any, data: Any) -> tuple[Any, dict[str, Any]]:
        # Each DDP rank draws its own masks; the weights start equal (same seed) and DDP keeps them so.
        rank = int(os.environ.get("RANK", "0"))
        return FreqMaskObjective(body, len(args.bands), seed=args.seed * 1000 + rank), {}

    return _label_free(args, report, args.backbone, "--backbone", args.method, "backbone", objective)


def run_distill(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
    """``rs-train distill``: a teacher's features into a student backbone (:mod:`training.distill`; RS4D, DRD)."""
    import torch

    from training.distill.losses import PerturbConfig
    from training.distill.objective import DistillObjective, cache_key
    from training.distill.teachers import build_teacher

    if args.drd_weight < 0:
        raise InputError("--drd-weight must be >= 0")
    perturb = PerturbConfig(mode=args.perturb, sigma=args.noise, mask_ratio=args.mask_ratio,
                            sigma_max=max(args.noise_max, args.noise), mask_max=max(args.mask_max, args.mask_ratio),
                            patch=args.mask_patch)

    def objective(body: Any, data: Any) -> tuple[Any, dict[str, Any]]:
        teacher = build_teacher(args.teacher)
        init = _init_student(body, args, data.mean.tolist(), data.std.tolist())
        frozen = _freeze_student(body, getattr(args, "freeze_stages", 0))
        cache = args.cache_dir / cache_key(args.teacher, data) if args.cache_dir else None
        obj = DistillObjective(body, teacher, data.mean.tolist(), data.std.tolist(), len(data), perturb,
                               drd_weight=args.drd_weight, cache_dir=cache)
        torch.manual_seed(args.seed * 1000 + int(os.environ.get("RANK", "0")))  # each rank its own noise, masks
        return obj, {"teacher": args.teacher, "teacher_features": teacher.describe(), "pairs": obj.pairs,
                     "perturb": vars(perturb), "drd_weight": args.drd_weight, "init_student": init,
                     "frozen": frozen}

    return _label_free(args, report, args.student_config, "--student-config", "distill", "student", objective)


def _label_free(args: argparse.Namespace, report: Callable[[dict], None], backbone: str, option: str, method: str,
                attribute: str, make_objective: Callable[[Any, Any], tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    """The one path of the label-free commands: chips, backbone, objective, loop, backbone file.

    ``make_objective(body, data) -> (objective, provenance)``; the trained body is the objective's ``attribute``.
    """
    import torch

    from rs_engine.models import BACKBONES, ModelConfig, build_backbone
    from training.pretrain import UnlabelledChips, run_pretraining, save_backbone, train_config_dict

    if backbone not in BACKBONES:
        raise InputError(f"{option} {backbone}: unknown (known: {', '.join(BACKBONES)})")
    cfg = train_config(args)
    if not args.out.parent.is_dir():
        raise InputError(f"{args.out}: its folder does not exist")
    dev = device(args.device)
    data = UnlabelledChips(args.images, size=args.chip_size, bands=args.bands, chips_per_image=args.chips_per_image,
                           seed=args.seed)
    torch.manual_seed(args.seed)  # equal initial weights on every DDP rank
    body = build_backbone(ModelConfig(backbone=backbone, in_channels=len(args.bands), tile_size=args.chip_size))
    objective, extra = make_objective(body, data)
    provenance = {**extra, "data": [portable(p) for p in args.images], "images": len(data.files), "chips": len(data),
                  "chip_size": args.chip_size, "train_config": train_config_dict(cfg), "command": command_line()}

    def save(out: Path, obj: torch.nn.Module, state: dict[str, Any]) -> None:
        save_backbone(out, getattr(obj, attribute), backbone=backbone, in_channels=len(args.bands), method=method,
                      mean=data.mean.tolist(), std=data.std.tolist(),
                      provenance={**provenance, "epochs": state["epoch"], "steps": state["step"],
                                  "train_minutes": round(state["seconds"] / 60, 1), "last": state["last"]})

    metrics = run_pretraining(objective, data, args.out, cfg, save, device=dev, progress=report)
    return {"output": str(args.out), "metrics": metrics}


def _freeze_student(body: Any, k: int) -> list[str]:
    """``--freeze-stages k``: the student's stem and first ``k`` stages keep their (e.g. ImageNet) weights, so the
    distillation trains only the later stages (for a hybrid: its SS2D stages). Returns the frozen prefixes."""
    from training.train import body_frozen_prefixes

    prefixes = body_frozen_prefixes(body, k)
    if k > 0 and not any(n.startswith(tuple(prefixes)) for n, _ in body.named_parameters()):
        raise InputError(f"--freeze-stages {k}: the student has no such stages")
    for name, p in body.named_parameters():
        if name.startswith(tuple(prefixes)):
            p.requires_grad_(False)
    return prefixes


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
