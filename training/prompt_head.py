"""Training of the SAM-style prompt head (:mod:`rs_engine.models.prompt_head`) on a frozen Mask R-CNN
(``rs-train prompt-head``), class-agnostic, on COCO instance datasets.

SAM's recipe (Kirillov et al. 2023, arXiv 2304.02643, sec. 3 and appendix A), scaled down to a CPU:

- per chip, up to ``objects`` truth instances; each is prompted once, by its box (each side moved by up to
  ``jitter`` of the box's extent, at most ``jitter_max`` px) or by one positive point drawn uniformly inside its
  mask, with probability ``box_share`` for the box;
- a box asks for the single-mask output, a point for the ``M`` ambiguity-aware outputs, of which only the best
  (lowest loss) is taught, so the others stay free to cover the other readings of an ambiguous click;
- loss per mask: ``focal_weight`` x focal loss (Lin et al. 2017; alpha 0.25, gamma 2) + dice loss, on the
  stride-4 logits upsampled (bilinear, :func:`~rs_engine.models.prompt_head.upscale`) to the chip's pixels: the
  masks a user gets are those upsampled logits thresholded at 0, so the loss judges exactly them, sub-stride
  boundaries included (small vehicles and ships are 3 to 6 stride-4 cells wide; downsampled truth would blur
  them); plus the mean squared error of the predicted IoU against the IoU the mask actually has.

The detector's backbone and FPN run under ``torch.no_grad`` each step (frozen: the head learns to read them as they
are, so the detector's own outputs are unchanged). The one training loop (:mod:`training.loop`) does the rest:
AdamW, warm-up and cosine decay over steps or the time budget, gradient clipping, the resume file
``OUT.resume.safetensors`` (the head and the optimizer only), the CSV log. The output is a new model file: the
detector's weights plus ``prompt_head.*``, its card the detector's with ``architecture["extra"]["prompt_head"]``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from rs_engine.checkpoint import ModelCard, load_model, save_model
from rs_engine.errors import InputError
from rs_engine.models.prompt_head import PAD_MULTIPLE, PromptHead, PromptHeadConfig, pad_window, upscale
from training import distributed
from training.coco import ChipSpec, CocoChips


@dataclass
class PromptTrainConfig:
    """How prompts are drawn and masks scored (see the module docstring)."""

    objects: int = 8
    box_share: float = 0.5
    jitter: float = 0.1
    jitter_max: float = 20.0
    focal_weight: float = 20.0


class ChipSets(torch.utils.data.ConcatDataset):
    """Several chip datasets as one; setting ``rng`` (the loop reseeds it per epoch, rank and worker) seeds each."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset]) -> None:
        super().__init__(datasets)
        self.rng = np.random.default_rng(0)

    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @rng.setter
    def rng(self, rng: np.random.Generator) -> None:
        self._rng = rng
        for d in self.datasets:
            d.rng = np.random.default_rng(rng.integers(2**63))


def sample_prompts(target: dict[str, Tensor], cfg: PromptTrainConfig, g: torch.Generator,
                   size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prompts for up to ``cfg.objects`` instances of one chip.

    Args:
        target: ``boxes`` (K, 4) x1 y1 x2 y2 px, ``masks`` (K, H, W) uint8 (:func:`training.augment.make_target`).
        size: (H, W) of the chip in px.

    Returns:
        ``box_idx`` (B,) instances prompted by a box, ``boxes`` (B, 4) their jittered boxes (px),
        ``point_idx`` (P,) instances prompted by a point, ``points`` (P, 1, 2) x y px inside their masks.
    """
    k = len(target["boxes"])
    chosen = torch.randperm(k, generator=g)[: cfg.objects]
    is_box = torch.rand(len(chosen), generator=g) < cfg.box_share
    box_idx, point_idx = chosen[is_box], chosen[~is_box]
    boxes = target["boxes"].cpu()[box_idx].float()  # prompts are drawn on the CPU (the generator's device)
    if len(boxes):
        extent = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        reach = (cfg.jitter * extent).clamp(max=cfg.jitter_max)
        boxes = boxes + (torch.rand(boxes.shape, generator=g) * 2 - 1) * reach
        h, w = size
        boxes = torch.stack([boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1),
                             boxes[:, 2].clamp(1, w), boxes[:, 3].clamp(1, h)], 1)  # fmt: skip
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    points = torch.zeros(len(point_idx), 1, 2)
    for j, i in enumerate(point_idx.tolist()):
        ys, xs = torch.nonzero(target["masks"][i].cpu(), as_tuple=True)
        pick = int(torch.randint(len(xs), (1,), generator=g))
        points[j, 0] = torch.stack([xs[pick], ys[pick]]).float()
    return box_idx, boxes, point_idx, points


def mask_losses(logits: Tensor, truth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-mask focal loss, dice loss and actual IoU.

    Args:
        logits: (K, M, H, W) mask logits at the chip's pixels.
        truth: (K, H, W) 0/1 masks.

    Returns:
        ``focal`` (K, M) mean over pixels, ``dice`` (K, M) ``1 - (2|A.B| + 1) / (|A| + |B| + 1)`` on
        probabilities, ``iou`` (K, M) of the masks ``logits > 0`` (no gradient).
    """
    t = truth[:, None].float().expand_as(logits)
    focal = sigmoid_focal_loss(logits, t, alpha=0.25, gamma=2.0, reduction="none").mean((-2, -1))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    with torch.no_grad():
        pred = logits > 0
        inter = (pred & (t > 0)).sum((-2, -1)).float()
        union = (pred | (t > 0)).sum((-2, -1)).float()
        iou = inter / union.clamp(min=1)
    return focal, dice, iou


class PromptObjective(nn.Module):
    """The head's loss over a batch of chips' FPN maps (an ``nn.Module`` so that DistributedDataParallel wraps it).

    ``forward(maps (B, C, S/16, S/16), targets, size (S, S), g) -> (loss, {"iou": mean IoU of the masks a user
    would get: the box's mask, or the point's output with the highest predicted IoU})``.
    """

    def __init__(self, head: PromptHead, cfg: PromptTrainConfig) -> None:
        super().__init__()
        self.head, self.cfg = head, cfg

    def forward(self, maps: Tensor, targets: list[dict[str, Tensor]], size: tuple[int, int],
                g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        terms: list[Tensor] = []
        ious: list[Tensor] = []
        zero = None
        for i, target in enumerate(targets):
            emb = self.head.embed({self.head.config.level: maps[i:i + 1]})
            zero = emb.sum() * 0  # a loss with a graph for a batch without objects
            if not len(target["boxes"]):
                continue
            box_idx, boxes, point_idx, points = sample_prompts(target, self.cfg, g, size)
            for idx, kw in ((box_idx, {"boxes": boxes.to(maps.device)}),
                            (point_idx, {"points": points.to(maps.device), "multimask": True})):
                if not len(idx):
                    continue
                logits, iou_pred = self.head(emb, size, **kw)
                focal, dice, iou = mask_losses(upscale(logits, size), target["masks"][idx.to(maps.device)])
                per_mask = self.cfg.focal_weight * focal + dice
                best = per_mask.argmin(1)  # one output for a box; the best of M for a point (SAM's min loss)
                rows = torch.arange(len(idx), device=maps.device)
                terms.append(per_mask[rows, best] + ((iou_pred - iou) ** 2).mean(1))
                ious.append(iou[rows, iou_pred.argmax(1)])
        if not terms:
            return zero, {"iou": 0.0}
        return torch.cat(terms).mean(), {"iou": float(torch.cat(ious).mean())}


def train_prompt_head(model: nn.Module, card: ModelCard, dataset: torch.utils.data.Dataset, out: Path, cfg: Any,
                      head_cfg: PromptHeadConfig | None = None, prompt_cfg: PromptTrainConfig | None = None,
                      device: str = "cpu", progress: Callable[[dict], None] | None = None,
                      provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a prompt head on the frozen ``model`` and write ``out``: ``model`` with the head attached, and its
    card with the head's config (after every epoch and when the time budget ends the run).

    Args:
        model: a Mask R-CNN (``rs_engine.checkpoint.load_model``); frozen, left in eval mode.
        card: its model card (copied; ``architecture["extra"]["prompt_head"]`` and provenance are added).
        dataset: chips ``(image (C, S, S), target)`` as :class:`training.coco.CocoChips` gives, S a multiple of 32.
        cfg: :class:`training.train.TrainConfig` (epochs, batch size, lr, warm-up, time budget, checkpoints, seed).
        head_cfg: head sizes; default :class:`PromptHeadConfig` with the model's FPN width.
        progress: the loop's event callback.
        provenance: facts about the data for ``card.provenance["prompt_head"]`` (paths, chips, command).

    Returns:
        the loop state: ``epoch``, ``step``, ``seconds``, ``last`` (the last epoch's mean ``loss`` and ``iou``).

    Raises:
        InputError: as :func:`training.loop.run_loop` (fewer chips than a batch).
    """
    from training.loop import Task, run_loop
    from training.train import collate

    d = distributed.setup(device)
    try:
        head_cfg = head_cfg or PromptHeadConfig(fpn_channels=model.backbone.out_channels)
        torch.manual_seed(cfg.seed)  # the same initial head on every DDP rank
        model.prompt_head = head = PromptHead(head_cfg)
        model.to(d.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        objective = PromptObjective(head, prompt_cfg or PromptTrainConfig())
        g = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)  # prompts; a resumed run draws new ones
        card = copy.deepcopy(card)
        card.architecture.setdefault("extra", {})["prompt_head"] = head_cfg.to_dict()
        base = card.label

        def step(net: nn.Module, batch: tuple[list, list]) -> tuple[Tensor, dict[str, float]]:
            images, targets = batch
            x = torch.stack(images)
            with torch.no_grad():
                maps = model.backbone(x)[head_cfg.level]
            return net(maps, targets, tuple(x.shape[-2:]), g)

        def end_epoch(state: dict[str, Any], means: dict[str, float], stopped: bool) -> dict[str, Any]:
            card.provenance["prompt_head"] = {
                **(provenance or {}), "base_model": base, "epochs": state["epoch"], "steps": state["step"],
                "train_minutes": round(state["seconds"] / 60, 1), "last": state["last"],
                "train_config": asdict(cfg), "prompts": asdict(objective.cfg),
            }  # fmt: skip
            save_model(out, model, card, half=cfg.half)
            return {"loss": round(means.get("loss", float("nan")), 4), "iou": round(means.get("iou", 0.0), 4)}

        task = Task(net=objective, step=step, modules={"head": head}, params=list(head.parameters()),
                    collate=collate, to_device=_to_device, end_epoch=end_epoch,
                    find_unused_parameters=True)  # a batch of boxes only leaves the multimask tokens unused
        return run_loop(task, dataset, Path(out), cfg, d, progress)
    finally:
        distributed.cleanup(d)


def _to_device(batch: tuple[list, list], device: str) -> tuple[list, list]:
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


@torch.no_grad()
def evaluate_head(model: nn.Module, dataset: torch.utils.data.Dataset, device: str = "cpu") -> dict[str, float]:
    """Mean IoU of ``model.prompt_head``'s masks on a dataset's chips, prompted by each instance's truth box
    (single output) and by the interior-most pixel of its mask (:func:`training.prompted.interior_point`; the
    output with the highest predicted IoU): a deterministic check of the head on chips, without the tiling of
    :mod:`training.prompted`.

    Returns:
        ``{"box_iou", "point_iou", "box_loss", "objects"}`` (``box_loss``: the training loss of the box masks,
        without the IoU term).
    """
    from training.prompted import interior_point

    head = model.prompt_head.eval()
    box, point, loss = [], [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        if not len(target["boxes"]):
            continue
        size = tuple(image.shape[-2:])
        emb = head.embed(model.backbone(pad_window(image.to(device))))
        truth = target["masks"].to(device)
        logits, _ = head(emb, size, boxes=target["boxes"].to(device))
        focal, dice, iou = mask_losses(upscale(logits, size), truth)
        box.append(iou[:, 0])
        loss.append((PromptTrainConfig.focal_weight * focal + dice)[:, 0])
        pts = torch.tensor([[interior_point(m)] for m in target["masks"].numpy().astype(bool)], dtype=torch.float32)
        logits, iou_pred = head(emb, size, points=pts.to(device), multimask=True)
        iou = mask_losses(upscale(logits, size), truth)[2]
        point.append(iou[torch.arange(len(iou)), iou_pred.argmax(1)])
    box_t, point_t = torch.cat(box), torch.cat(point)
    return {"box_iou": round(float(box_t.mean()), 4), "point_iou": round(float(point_t.mean()), 4),
            "box_loss": round(float(torch.cat(loss).mean()), 4), "objects": len(box_t)}


def run(args: argparse.Namespace, report: Callable[[dict], None]) -> dict[str, Any]:
    """``rs-train prompt-head``: chips from each ``--coco``/``--images`` pair, normalised as the base model's card
    says (a 1-band dataset's images repeat into a 3-band model's bands, as inference does), then
    :func:`train_prompt_head`.

    Raises:
        InputError: unequal numbers of --coco and --images, a chip size that is not a multiple of 32, a missing or
            unreadable dataset or model, a ``head = "prompt"`` model.
    """
    from training.commands import command_line, device, portable, train_config

    if len(args.coco) != len(args.images):
        raise InputError(f"give one --images folder per --coco file ({len(args.coco)} --coco, "
                         f"{len(args.images)} --images)")
    if args.chip_size % PAD_MULTIPLE or args.chip_size < 2 * PAD_MULTIPLE:
        raise InputError(f"--chip-size {args.chip_size}: use a multiple of {PAD_MULTIPLE} px, at least 64")
    dev = device(args.device)
    model, card = load_model(args.model, "cpu")
    if card.architecture.get("head") == "prompt":
        raise InputError(f"{args.model}: has a prompt head as its mask head already, trained with it (head = "
                         "prompt); rs-train prompt-head adds one to a Mask R-CNN model")
    spec = ChipSpec(args.chip_size, list(range(card.bands)), card.mean, card.std)
    sets = [CocoChips(c, i, spec, train=True, chips_per_image=args.chips_per_image, seed=args.seed)
            for c, i in zip(args.coco, args.images)]  # fmt: skip
    provenance = {"data": [portable(c) for c in args.coco], "chips": sum(len(s) for s in sets),
                  "chip_size": args.chip_size, "command": command_line()}
    card.name = args.name or Path(args.out).stem
    cfg = train_config(args)
    prompts = PromptTrainConfig(objects=args.objects)
    state = train_prompt_head(model, card, ChipSets(sets), Path(args.out), cfg, prompt_cfg=prompts, device=dev,
                              progress=report, provenance=provenance)
    return {"output": str(args.out), "last": state["last"], "steps": state["step"]}
