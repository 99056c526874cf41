"""Training loop for Mask R-CNN models: AdamW, linear warm-up + cosine decay, gradient clipping, mixed precision
on CUDA, freezing (backbone or its first stages), early stopping on validation mask AP, periodic checkpoints that a
re-run of the same command resumes from (mid-epoch, at the same batch), CSV log + PNG curves, progress events, and
DistributedDataParallel when launched by torchrun (:mod:`training.distributed`).

The resume state (weights, optimizer moments, step, epoch, best AP) is a safetensors file plus JSON metadata beside
the output, ``OUT.resume.safetensors``: nothing is pickled. It stays after training completes: re-running the
finished command does nothing, re-running it with more epochs continues with the cosine schedule stretched to them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rs_engine.checkpoint import ModelCard, save_model
from training import distributed
from training.distributed import Dist

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
    k = cfg.freeze_stages
    if k <= 0:
        return []
    body = model.backbone.body
    p = "backbone.body."
    if hasattr(body, "freeze_prefixes"):  # EfficientNet-Lite and hybrid bodies name their own stages
        return [p + q for q in body.freeze_prefixes(k)]
    if hasattr(body, "stages"):  # hierarchical SSM: stem, stage i, then the downsampling into stage i + 1
        return [p + "patch_embed."] + [p + f"stages.{i}." for i in range(k)] + [p + f"downsamples.{i}."
                                                                               for i in range(min(k, 3))]
    if hasattr(body, "blocks"):  # plain SSM: the blocks split in 4 equal "stages"
        n = len(body.blocks) * min(k, 4) // 4
        return [p + "patch_embed.", p + "pos_embed"] + [p + f"blocks.{i}." for i in range(n)]
    return [p + "conv1.", p + "bn1."] + [p + f"layer{i + 1}." for i in range(min(k, 4))]  # ResNet


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


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "rng"):
        info.dataset.rng = np.random.default_rng(torch.initial_seed() % 2**63)


def train(model: torch.nn.Module, card: ModelCard, train_set: torch.utils.data.Dataset, out: Path,
          cfg: TrainConfig, evaluate: Callable[[torch.nn.Module], dict] | None = None, device: str = "cpu",
          progress: ProgressFn | None = None, extra_loss: ExtraLoss | None = None) -> dict[str, Any]:
    """Train ``model`` on ``train_set``; write the best model (by validation mask AP when ``evaluate`` is given,
    else the last) to ``out`` with its card; resume from ``out``'s resume file when one exists.

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

    Returns:
        the best metrics dict (also stored in ``card.provenance["metrics"]``); empty without ``evaluate``.
    """
    d = distributed.setup(device)
    try:
        return _train(model, card, train_set, Path(out), cfg, evaluate, d, progress, extra_loss)
    finally:
        distributed.cleanup(d)


def _train(model: torch.nn.Module, card: ModelCard, train_set: torch.utils.data.Dataset, out: Path,
           cfg: TrainConfig, evaluate: Callable | None, d: Dist, progress: ProgressFn | None,
           extra_loss: ExtraLoss | None = None) -> dict[str, Any]:
    resume_path = out.with_suffix(".resume.safetensors")
    log_path = out.with_suffix(".log.csv")
    device = d.device
    model.to(device)
    if (n := apply_freeze(model, cfg)):
        log.info("froze %d parameter tensors (%s)", n, ", ".join(frozen_prefixes(model, cfg)))
    params = [p for p in model.parameters() if p.requires_grad]
    extra = extra_loss if isinstance(extra_loss, torch.nn.Module) else None
    extra_params = [p for p in extra.to(device).parameters() if p.requires_grad] if extra is not None else []
    params += extra_params
    opt = adamw(params, cfg)
    sampler, steps_per_epoch = epoch_sampler(len(train_set), cfg, d)
    total_steps = cfg.epochs * steps_per_epoch
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_ap": -1.0, "best_epoch": 0, "seconds": 0.0,
                             "metrics": {}}
    if resume_path.exists():
        state = {**state, **_load_resume(resume_path, model, opt, extra)}
        log.info("resumed from %s at epoch %d step %d", resume_path, state["epoch"], state["step"])
    # Mask R-CNN leaves the mask head unused on batches without positives: find_unused_parameters.
    net = ddp_wrap(model, d, find_unused_parameters=True)
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = time.monotonic() - state["seconds"]
    last_ckpt = time.monotonic()
    stop = False
    fh = open(log_path, "a", newline="") if d.main else None  # noqa: SIM115 (closed in finally)
    try:
        writer = csv.writer(fh) if fh else None
        if writer and fh.tell() == 0:
            writer.writerow(["epoch", "step", "lr", "loss", "mask_ap", "box_ap", "minutes"])
        while state["epoch"] < cfg.epochs and not stop:
            epoch = state["epoch"]
            first = state["step"] - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
            sampler.set_epoch(epoch, first)
            if hasattr(train_set, "rng"):
                train_set.rng = np.random.default_rng([cfg.seed, d.rank, epoch, first])
            loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                                 collate_fn=collate, num_workers=cfg.num_workers,
                                                 worker_init_fn=_seed_worker, drop_last=True)
            net.train()
            running, n = 0.0, 0
            lr = lr_at(state["step"], total_steps, cfg, state["seconds"])
            for images, targets in loader:
                images = [i.to(device, non_blocking=True) for i in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                # DDP ranks step in lockstep, so their clocks (time-based decay) agree to within a step.
                lr = lr_at(state["step"], total_steps, cfg, time.monotonic() - start)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast("cuda", enabled=use_amp):
                    losses = net(images, targets)
                    loss = sum(losses.values())
                    if extra_loss is not None:
                        loss = loss + extra_loss(model, images)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_grads(d, extra_params)  # outside DDP's wrapper: average them here
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                scaler.step(opt)
                scaler.update()
                state["step"] += 1
                running += float(loss.detach())
                n += 1
                state["seconds"] = time.monotonic() - start
                if d.main:
                    if progress:
                        progress({"event": "progress", "epoch": epoch + 1, "epochs": cfg.epochs,
                                  "done": first + n, "total": steps_per_epoch, "loss": round(running / n, 4)})
                    if state["step"] % 20 == 0:
                        log.info("epoch %d step %d lr %.2e loss %.3f", epoch, state["step"], lr, running / n)
                    if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                        _save_resume(resume_path, model, opt, state, extra)
                        last_ckpt = time.monotonic()
                over_time = bool(cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60)
                if distributed.broadcast_flag(d, over_time):
                    stop = True
                    break
            epoch_loss = distributed.all_mean(d, running / max(n, 1))
            if not stop:
                state["epoch"] += 1
            ap = box = float("nan")
            last = state["epoch"] == cfg.epochs or stop
            if d.main:
                if evaluate is not None and (state["epoch"] % cfg.eval_every == 0 or last) and not stop:
                    metrics = evaluate(model)
                    model.train()
                    ap, box = metrics["segm"]["AP"], metrics["bbox"]["AP"]
                    if ap > state["best_ap"]:
                        state["best_ap"], state["best_epoch"], state["metrics"] = ap, state["epoch"], metrics
                        _write_model(out, model, card, state, cfg)
                elif evaluate is None:
                    _write_model(out, model, card, state, cfg)
                # A run stopped by its time budget logs the fraction of the epoch it did (e.g. 16.12).
                done = state["epoch"] + (round((first + n) / steps_per_epoch, 2) if stop else 0)
                writer.writerow([done, state["step"], f"{lr:.3g}", f"{epoch_loss:.4f}", ap, box,
                                 f"{state['seconds'] / 60:.1f}"])
                fh.flush()
                _save_resume(resume_path, model, opt, state, extra)
                last_ckpt = time.monotonic()
                try:
                    plot_curves(log_path, out.with_suffix(".curves.png"))
                except (OSError, ValueError, KeyError) as exc:  # a convenience: never stop training for it
                    log.warning("could not plot %s: %s", log_path, exc)
                if progress:
                    progress({"event": "epoch", "epoch": state["epoch"], "loss": round(epoch_loss, 4),
                              "mask_ap": None if math.isnan(ap) else ap, "box_ap": None if math.isnan(box) else box,
                              "minutes": round(state["seconds"] / 60, 2)})
            if stop:
                log.info("time budget of %.0f min reached; re-run to continue", cfg.max_minutes)
            patience_over = bool(cfg.patience and evaluate is not None
                                 and state["epoch"] - state["best_epoch"] >= cfg.patience * cfg.eval_every)
            if distributed.broadcast_flag(d, patience_over) and not stop:
                log.info("early stop: no mask AP gain for %d evaluations (best %.2f at epoch %d)",
                         cfg.patience, state["best_ap"], state["best_epoch"])
                break
            distributed.barrier(d)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the CLI maps it): keep the progress for a re-run
        if d.main and state["step"] > 0:
            _save_resume(resume_path, model, opt, state, extra)
            log.info("interrupted at step %d; state saved to %s", state["step"], resume_path)
        raise
    finally:
        if fh:
            fh.close()
    if d.main and evaluate is not None and not out.exists():
        _write_model(out, model, card, state, cfg)  # no evaluation happened (time budget): keep the weights
    return state["metrics"]


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


def _save_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict,
                 extra: torch.nn.Module | None = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if extra is not None:
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in extra.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 extra: torch.nn.Module | None = None) -> dict:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if extra is not None:
        extra.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v.to(next(model.parameters()).device)
    opt.load_state_dict(opt_state)
    return json.loads(meta["state"])


def init_from(model: torch.nn.Module, source: str | Path, same_classes: bool = True) -> dict[str, Any]:
    """Initialise ``model`` from a model file (bundled name or path): every tensor whose name and shape match is
    copied; an input conv for another band count is adapted (:func:`adapt_input_conv`); the rest (new classes)
    keeps its fresh initialisation.

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
        elif k in own and _is_input_conv(own[k], v):
            copy[k] = adapt_input_conv(v, own[k].shape[1]).to(own[k].dtype)
            adapted.append(k)
        else:
            skipped.append(k)
    model.load_state_dict(copy, strict=False)
    log.info("initialised %d tensors from %s; %d left new", len(copy), path, len(own) - len(copy))
    return {"source": str(source), "copied": len(copy), "adapted": adapted, "skipped": skipped}


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
