"""Training loop for Mask R-CNN models: AdamW, linear warm-up + cosine decay, gradient clipping, mixed precision
on CUDA, periodic checkpoints that a re-run of the same command resumes from, CSV log, best-on-validation.

The resume state (weights, optimizer moments, step, RNG-free epoch counter) is a safetensors file plus JSON
metadata beside the output, ``OUT.resume.safetensors``: nothing is pickled.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rs_engine.checkpoint import ModelCard, save_model

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings. ``epochs`` counts passes over the training chips; ``max_minutes`` stops early."""

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


def collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to 1 % of it (Loshchilov & Hutter 2017, SGDR)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, card: ModelCard, train_set: torch.utils.data.Dataset, out: Path,
          cfg: TrainConfig, evaluate=None, device: str = "cpu") -> dict[str, Any]:
    """Train ``model`` on ``train_set``; write the best model (by validation mask AP when ``evaluate`` is given,
    else the last) to ``out`` with its card; resume from ``out``'s resume file when one exists.

    Args:
        evaluate: ``evaluate(model) -> {"segm": {"AP": ...}, "bbox": {...}}`` or None.

    Returns:
        the final metrics dict (also stored in ``card.provenance["metrics"]``).
    """
    out = Path(out)
    resume_path = out.with_suffix(".resume.safetensors")
    log_path = out.with_suffix(".log.csv")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0)
    total_steps = cfg.epochs * len(loader)
    state = {"epoch": 0, "step": 0, "best_ap": -1.0, "seconds": 0.0, "metrics": {}}
    if resume_path.exists():
        state = _load_resume(resume_path, model, opt)
        log.info("resumed from %s at epoch %d step %d", resume_path, state["epoch"], state["step"])
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = time.monotonic() - state["seconds"]
    last_ckpt = time.monotonic()
    new_log = not log_path.exists()
    with open(log_path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new_log:
            writer.writerow(["epoch", "step", "lr", "loss", "mask_ap", "box_ap", "minutes"])
        while state["epoch"] < cfg.epochs:
            model.train()
            running, n = 0.0, 0
            for images, targets in loader:
                images = [i.to(device, non_blocking=True) for i in images]
                targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                lr = lr_at(state["step"], total_steps, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast("cuda", enabled=use_amp):
                    losses = model(images, targets)
                    loss = sum(losses.values())
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                scaler.step(opt)
                scaler.update()
                state["step"] += 1
                running += float(loss.detach())
                n += 1
                if state["step"] % 20 == 0:
                    log.info("epoch %d step %d lr %.2e loss %.3f", state["epoch"], state["step"], lr, running / n)
                state["seconds"] = time.monotonic() - start
                if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                    _save_resume(resume_path, model, opt, state)
                    last_ckpt = time.monotonic()
                if cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60:
                    break
            state["epoch"] += 1
            ap = box = float("nan")
            if evaluate is not None and (state["epoch"] % cfg.eval_every == 0 or state["epoch"] == cfg.epochs):
                metrics = evaluate(model)
                ap, box = metrics["segm"]["AP"], metrics["bbox"]["AP"]
                if ap > state["best_ap"]:
                    state["best_ap"], state["metrics"] = ap, metrics
                    _write_model(out, model, card, state, cfg)
            elif evaluate is None:
                _write_model(out, model, card, state, cfg)
            writer.writerow([state["epoch"], state["step"], f"{lr:.3g}", f"{running / max(n, 1):.4f}", ap, box,
                             f"{state['seconds'] / 60:.1f}"])
            fh.flush()
            _save_resume(resume_path, model, opt, state)
            if cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60:
                log.info("time budget of %.0f min reached", cfg.max_minutes)
                break
    return state["metrics"]


def _write_model(out: Path, model: torch.nn.Module, card: ModelCard, state: dict, cfg: TrainConfig) -> None:
    card.provenance.update({
        "epochs": state["epoch"], "steps": state["step"], "train_minutes": round(state["seconds"] / 60, 1),
        "metrics": state["metrics"], "train_config": asdict(cfg),
    })
    save_model(out, model, card, half=cfg.half)


def _save_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(opt_state)
    return json.loads(meta["state"])
