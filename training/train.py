"""Training of Mask R-CNN models (``rs-train train`` and ``finetune``) as a task of the one loop
(:mod:`training.loop`): AdamW, linear warm-up + cosine decay, gradient clipping, mixed precision on CUDA, freezing
(backbone or its first stages), early stopping on validation mask AP, periodic checkpoints that a re-run of the same
command resumes from (mid-epoch, at the same batch), CSV log + PNG curves, progress events, and
DistributedDataParallel when launched by torchrun (:mod:`training.distributed`).

The resume state (weights, optimizer moments, step, epoch, best AP) is a safetensors file plus JSON metadata beside
the output, ``OUT.resume.safetensors``: nothing is pickled. It stays after training completes: re-running the
finished command does nothing, re-running it with more epochs continues with the cosine schedule stretched to them.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rs_engine.checkpoint import ModelCard, save_model
from training import distributed
from training.distributed import Dist
from training.loop import Task, run_loop

if TYPE_CHECKING:
    from training.prompt_head import PromptTrainConfig

log = logging.getLogger(__name__)

#: ``progress(event)`` receives dicts: ``{"event": "progress", "epoch", "epochs", "done", "total", "loss"}`` per
#: step and ``{"event": "epoch", "epoch", "loss", "mask_ap", "box_ap", "minutes"}`` per epoch (rank 0 only).
ProgressFn = Callable[[dict[str, Any]], None]
#: ``extra_loss(model, images) -> scalar Tensor``: a loss added at every training step (see :func:`train`).
ExtraLoss = Callable[[torch.nn.Module, list], torch.Tensor]


@dataclass
class TrainConfig:
    """Optimisation settings. ``epochs`` counts passes over the training chips; ``max_minutes`` stops early.

    ``freeze_backbone`` freezes the whole backbone body (FPN and heads still train); ``freeze_stages = k`` freezes
    its stem and first ``k`` stages (of 4). ``patience``: stop when validation mask AP has not improved for that
    many evaluations (None: never). ``batch_size`` is per process under DDP.
    """

    epochs: int = 12
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    clip_norm: float = 5.0
    checkpoint_minutes: float = 10.0
    max_minutes: float | None = None
    eval_every: int = 1
    num_workers: int = 1
    half: bool = True
    freeze_backbone: bool = False
    freeze_stages: int = 0
    patience: int | None = None
    seed: int = 0


def collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


def lr_at(step: int, total: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to 1 % of it (Loshchilov & Hutter 2017, SGDR).

    With a time budget (``cfg.max_minutes``) the decay follows whichever is further along, steps or time
    (``seconds`` of training so far), so a run cut by its budget still ends at a low learning rate: "train for
    10 minutes" on a laptop gives a finished schedule, not a model stopped at its peak learning rate.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.max_minutes:
        progress = max(progress, seconds / (cfg.max_minutes * 60))
    progress = min(1.0, progress)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))



def adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` with weight decay on weights (ndim > 1) only, never on biases and norm scales."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=cfg.lr)


def epoch_sampler(n: int, cfg: TrainConfig, d: Dist) -> tuple[EpochSampler, int]:
    """The resumable sampler over ``n`` chips and its batches per epoch (per process).

    Raises:
        InputError: fewer chips than one batch per process.
    """
    from rs_engine.errors import InputError

    sampler = EpochSampler(n, cfg.batch_size, d, cfg.seed)
    steps = sampler.batches_per_epoch()
    if steps == 0:
        raise InputError(f"the training set has {n} chips, fewer than one batch of {cfg.batch_size} per process: "
                         "lower --batch-size or add data")
    return sampler, steps


def ddp_wrap(module: torch.nn.Module, d: Dist, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when running under torchrun, else ``module`` itself."""
    if not d.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[d.local_rank] if d.device.startswith("cuda") else None,
        find_unused_parameters=find_unused_parameters)


def frozen_prefixes(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """Parameter-name prefixes that ``cfg`` freezes, for SSM (hierarchical or plain) and ResNet bodies."""
    if cfg.freeze_backbone:
        return ["backbone.body."]
    return ["backbone.body." + q for q in body_frozen_prefixes(model.backbone.body, cfg.freeze_stages)]


def body_frozen_prefixes(body: torch.nn.Module, k: int) -> list[str]:
    """Parameter-name prefixes, within ``body``, of its stem and first ``k`` stages (none for ``k <= 0``).

    Shared by ``rs-train train/finetune --freeze-stages`` and ``rs-train distill --freeze-stages``.
    """
    if k <= 0:
        return []
    if hasattr(body, "freeze_prefixes"):  # EfficientNet-Lite and hybrid bodies name their own stages
        return list(body.freeze_prefixes(k))
    if hasattr(body, "stages"):  # hierarchical SSM: stem, stage i, then the downsampling into stage i + 1
        return ["patch_embed."] + [f"stages.{i}." for i in range(k)] + [f"downsamples.{i}." for i in range(min(k, 3))]
    if hasattr(body, "blocks"):  # plain SSM: the blocks split in 4 equal "stages"
        n = len(body.blocks) * min(k, 4) // 4
        return ["patch_embed.", "pos_embed"] + [f"blocks.{i}." for i in range(n)]
    return ["conv1.", "bn1."] + [f"layer{i + 1}." for i in range(min(k, 4))]  # ResNet


def apply_freeze(model: torch.nn.Module, cfg: TrainConfig) -> int:
    """Set ``requires_grad=False`` on the frozen parameters; returns how many tensors were frozen."""
    prefixes = frozen_prefixes(model, cfg)
    n = 0
    for name, p in model.named_parameters():
        if any(name.startswith(x) for x in prefixes):
            p.requires_grad_(False)
            n += 1
    return n


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, split across DDP ranks, that can start mid-epoch (for resume).

    Each rank takes ``perm[rank::world]`` cut to whole batches; ``start`` skips that many batches.
    """

    def __init__(self, n: int, batch_size: int, d: Dist, seed: int = 0) -> None:
        self.n, self.batch_size, self.d, self.seed = n, batch_size, d, seed
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return (self.n // self.d.world_size) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[self.d.rank::self.d.world_size]
        perm = perm[: self.batches_per_epoch() * self.batch_size]
        return iter(perm[self.start * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start) * self.batch_size


def train(model: torch.nn.Module, card: ModelCard, train_set: torch.utils.data.Dataset, out: Path,
          cfg: TrainConfig, evaluate: Callable[[torch.nn.Module], dict] | None = None, device: str = "cpu",
          progress: ProgressFn | None = None, extra_loss: ExtraLoss | None = None,
          prompts: PromptTrainConfig | None = None) -> dict[str, Any]:
    """Train ``model`` on ``train_set``; write the best model (by validation mask AP when ``evaluate`` is given,
    else the last) to ``out`` with its card; resume from ``out``'s resume file when one exists.

    A ``head = "prompt"`` model (``card.architecture["head"]``) trains its prompt head as its mask head, jointly
    (:class:`training.prompt_instances.PromptInstanceLoss`: the prompt head's loss instead of the FCN mask loss), and
    ``evaluate`` gets it in :class:`~rs_engine.models.prompter.PromptHeadInstances` (masks from the prompt head).

    Under torchrun every process calls this with the same arguments; rank 0 evaluates and writes.

    Args:
        train_set: items ``(image (C, S, S) float32, target dict)`` (:class:`training.coco.CocoChips`,
            :class:`training.local.LocalChips`); an ``rng`` attribute is reseeded per epoch and rank.
        evaluate: ``evaluate(model) -> {"segm": {"AP": ...}, "bbox": {...}}`` or None.
        device: ``cpu`` or ``cuda`` (under DDP each rank takes its local GPU).
        progress: event callback (see :data:`ProgressFn`).
        extra_loss: ``extra_loss(model, images) -> scalar Tensor`` added to the Mask R-CNN losses at every step
            (e.g. :class:`training.distill.objective.DRDExtraLoss`); when it is an ``nn.Module`` its trainable
            parameters are optimised too and kept in the resume file (never in the model file).
        prompts: a prompt-head model's training prompts (:func:`training.prompt_instances.joint_prompts` when None).

    Returns:
        the best metrics dict (also stored in ``card.provenance["metrics"]``); empty without ``evaluate``.
    """
    d = distributed.setup(device)
    try:
        return _train(model, card, train_set, Path(out), cfg, evaluate, d, progress, extra_loss, prompts)
    finally:
        distributed.cleanup(d)


def _train(model: torch.nn.Module, card: ModelCard, train_set: torch.utils.data.Dataset, out: Path,
           cfg: TrainConfig, evaluate: Callable | None, d: Dist, progress: ProgressFn | None,
           extra_loss: ExtraLoss | None = None, prompts: PromptTrainConfig | None = None) -> dict[str, Any]:
    model.to(d.device)
    net = scored = model  # what the loop calls; what evaluate scores
    if card.architecture.get("head") == "prompt":  # RSPrompter-anchor: the prompt head's mask loss, jointly
        from rs_engine.models.prompter import PromptHeadInstances
        from training.prompt_instances import PromptInstanceLoss

        net = PromptInstanceLoss(model, prompts, seed=cfg.seed * 1000 + d.rank)
        scored = PromptHeadInstances(model)
        card.provenance["prompts"] = asdict(net.prompts)
    if (n := apply_freeze(model, cfg)):
        log.info("froze %d parameter tensors (%s)", n, ", ".join(frozen_prefixes(model, cfg)))
    params = [p for p in model.parameters() if p.requires_grad]
    extra = extra_loss if isinstance(extra_loss, torch.nn.Module) else None
    extra_params = [p for p in extra.to(d.device).parameters() if p.requires_grad] if extra is not None else []

    def step(net: torch.nn.Module, batch: tuple[list, list]) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch
        loss = sum(net(images, targets).values())
        if extra_loss is not None:
            loss = loss + extra_loss(model, images)
        return loss, {}

    def end_epoch(state: dict[str, Any], means: dict[str, float], stopped: bool) -> dict[str, Any]:
        ap = box = float("nan")
        last = state["epoch"] == cfg.epochs or stopped
        if evaluate is not None and (state["epoch"] % cfg.eval_every == 0 or last) and not stopped:
            metrics = evaluate(scored)
            model.train()
            ap, box = metrics["segm"]["AP"], metrics["bbox"]["AP"]
            if ap > state["best_ap"]:
                state["best_ap"], state["best_epoch"], state["metrics"] = ap, state["epoch"], metrics
                _write_model(out, model, card, state, cfg)
        elif evaluate is None:
            _write_model(out, model, card, state, cfg)
        return {"loss": round(means.get("loss", float("nan")), 4), "mask_ap": ap, "box_ap": box}

    def stop_early(state: dict[str, Any]) -> bool:
        over = bool(cfg.patience and evaluate is not None
                    and state["epoch"] - state["best_epoch"] >= cfg.patience * cfg.eval_every)  # fmt: skip
        if over:
            log.info("early stop: no mask AP gain for %d evaluations (best %.2f at epoch %d)", cfg.patience,
                     state["best_ap"], state["best_epoch"])  # fmt: skip
        return over

    task = Task(
        net=net, step=step, modules={"model": model, **({"extra": extra} if extra is not None else {})},
        params=params + extra_params, collate=collate, to_device=_to_device, end_epoch=end_epoch,
        hand_synced=extra_params,  # outside DDP's wrapper: the loop averages them
        state={"best_ap": -1.0, "best_epoch": 0, "metrics": {}}, stop_early=stop_early,
        find_unused_parameters=True,  # Mask R-CNN leaves the mask head unused on batches without positives
        plot=lambda log_csv: plot_curves(log_csv, out.with_suffix(".curves.png")),
    )  # fmt: skip
    state = run_loop(task, train_set, out, cfg, d, progress)
    if d.main and evaluate is not None and not out.exists():
        _write_model(out, model, card, state, cfg)  # no evaluation happened (time budget): keep the weights
    return state["metrics"]


def _to_device(batch: tuple[list, list], device: str) -> tuple[list, list]:
    images, targets = batch
    return ([i.to(device, non_blocking=True) for i in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])  # fmt: skip


def _write_model(out: Path, model: torch.nn.Module, card: ModelCard, state: dict, cfg: TrainConfig) -> None:
    card.provenance.update({
        "epochs": state["epoch"], "steps": state["step"], "train_minutes": round(state["seconds"] / 60, 1),
        "metrics": state["metrics"], "train_config": asdict(cfg),
    })
    save_model(out, model, card, half=cfg.half)


def plot_curves(log_csv: Path, png: Path) -> None:
    """Training loss and validation mask/box AP per epoch from the CSV log, as a PNG (matplotlib, Agg)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():  # Debian's system matplotlib beside the venv's: Axes3D warning, harmless here
        warnings.simplefilter("ignore")
        import matplotlib.pyplot as plt

    with open(log_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "epoch" not in reader.fieldnames:
            raise ValueError("no header row")
        rows = list(reader)
    if not rows:
        return
    epoch = [float(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(epoch, [float(r["loss"]) for r in rows], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    ap = [(e, float(r["mask_ap"]), float(r["box_ap"])) for e, r in zip(epoch, rows) if r["mask_ap"] not in ("", "nan")]
    if ap:
        ax2 = ax.twinx()
        ax2.plot([a[0] for a in ap], [a[1] for a in ap], "s-", color="tab:red", label="val mask AP")
        ax2.plot([a[0] for a in ap], [a[2] for a in ap], "^--", color="tab:orange", label="val box AP")
        ax2.set_ylabel("AP (%)", color="tab:red")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_title(log_csv.name.replace(".log.csv", ""))
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def init_from(model: torch.nn.Module, source: str | Path, same_classes: bool = True) -> dict[str, Any]:
    """Initialise ``model`` from a model file (bundled name or path): every tensor whose name and shape match is
    copied; an input conv for another band count is adapted (:func:`adapt_input_conv`); a dense 3x3 conv whose
    place holds a depthwise-separable pair (``separable_fpn``) is factorised (:func:`factorise_separable`); the rest
    (new classes) keeps its fresh initialisation.

    Args:
        same_classes: False when the class list differs: the class-specific box and mask predictors are never
            copied then, even where their shapes happen to match.

    Returns:
        ``{"source", "copied", "adapted", "skipped"}`` (tensors copied, names adapted and skipped), for the card's
        provenance.

    Raises:
        InputError: the model file is missing or unreadable (from :mod:`rs_engine.checkpoint`).
    """
    from rs_engine.checkpoint import load_state, resolve_model

    path = resolve_model(str(source))
    state, _ = load_state(path)
    own = model.state_dict()
    predictors = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
    copy, skipped, adapted = {}, [], []
    for k, v in state.items():
        if k in own and own[k].shape == v.shape and (same_classes or not k.startswith(predictors)):
            copy[k] = v.to(own[k].dtype)
        elif _is_separable_pair(own, k, v):  # a dense 3x3 conv into a depthwise-separable one (separable_fpn)
            pw = k.removesuffix("0.weight") + "1.weight"
            copy[k], copy[pw] = (t.to(own[k].dtype) for t in factorise_separable(v))
            bias = k.removesuffix("weight") + "bias"
            if bias in state:
                copy[pw.removesuffix("weight") + "bias"] = state[bias].to(own[k].dtype)
            adapted.append(k)
        elif k in own and _is_input_conv(own[k], v):
            copy[k] = adapt_input_conv(v, own[k].shape[1]).to(own[k].dtype)
            adapted.append(k)
        else:
            skipped.append(k)
    skipped = [k for k in skipped if not (k.endswith(".0.bias") and k.removesuffix("bias") + "weight" in adapted)]
    model.load_state_dict(copy, strict=False)
    log.info("initialised %d tensors from %s; %d left new", len(copy), path, len(own) - len(copy))
    return {"source": str(source), "copied": len(copy), "adapted": adapted, "skipped": skipped}


def _is_separable_pair(own: dict[str, torch.Tensor], key: str, dense: torch.Tensor) -> bool:
    """``key`` names a depthwise kernel (C, 1, k, k) in ``own``, followed by its pointwise (O, C, 1, 1) at
    ``...1.weight``, and ``dense`` is the (O, C, k, k) kernel they replace."""
    pw = key.removesuffix("0.weight") + "1.weight"
    if not key.endswith(".0.weight") or key not in own or pw not in own or dense.ndim != 4:
        return False
    o, c, kh, kw = dense.shape
    return own[key].shape == (c, 1, kh, kw) and own[pw].shape == (o, c, 1, 1)


def factorise_separable(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise-separable convolution closest to a dense one: (O, C, k, k) -> depthwise (C, 1, k, k) and
    pointwise (O, C, 1, 1) with ``pointwise[o, c] * depthwise[c] ~ weight[o, c]``, the best rank-1 approximation
    (SVD, least squares) of each input channel's (O, k*k) kernel matrix. A starting point for fine-tuning a
    dense-neck model into a ``separable_fpn`` one, not an exact conversion (a separable conv has rank 1 there)."""
    o, c, kh, kw = weight.shape
    mats = weight.double().permute(1, 0, 2, 3).reshape(c, o, kh * kw)
    u, sv, vh = torch.linalg.svd(mats, full_matrices=False)
    root = sv[:, :1].sqrt()
    pointwise = (u[:, :, 0] * root).T.reshape(o, c, 1, 1)
    depthwise = (vh[:, 0, :] * root).reshape(c, 1, kh, kw)
    return depthwise.float(), pointwise.float()


def _is_input_conv(new: torch.Tensor, old: torch.Tensor) -> bool:
    """A 4-D conv weight that differs only in its input channels (a different band count)."""
    return new.ndim == old.ndim == 4 and new.shape[0] == old.shape[0] and new.shape[2:] == old.shape[2:]


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-layer conv weights (O, C_old, kh, kw) for ``in_channels`` input bands.

    One band: the sum over the old channels, so a single band gives exactly the response the old model gave to
    that band repeated in every channel (pan or SAR into an RGB model). Otherwise the channel mean, repeated and
    scaled by ``C_old / in_channels`` so that equal bands again give the old response (the rule of timm's
    ``adapt_input_conv``).
    """
    w = weight.float()
    if in_channels == 1:
        return w.sum(1, keepdim=True)
    mean = w.mean(1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (w.shape[1] / in_channels)
