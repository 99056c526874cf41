"""The one optimisation loop of rs-train: ``train``, ``finetune``, ``distill`` and ``pretrain`` all run
:func:`run_loop` with a :class:`Task` that says what one step computes and what the end of an epoch does.

What the loop owns, the same for every task: the seeded epoch sampler split across DDP ranks (resumable mid-epoch,
data workers and the dataset's ``rng`` reseeded per epoch and rank), AdamW's learning rate (linear warm-up, cosine
decay over steps or the time budget, :func:`training.train.lr_at`), mixed precision on CUDA, gradient clipping,
the time budget, periodic and end-of-epoch resume files written beside the output and renamed into place, the CSV
log and progress events, and saving the resume state on Ctrl-C or SIGTERM.

The resume file ``OUT.resume.safetensors`` holds each module of :attr:`Task.modules` under its name
(``model.*``, ``extra.*``), the optimizer moments (``optim.*``) and the loop state as JSON metadata; nothing is
pickled.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from rs_engine.checkpoint import write_safetensors
from rs_engine.errors import raise_write_error
from training import distributed
from training.distributed import Dist

log = logging.getLogger(__name__)

#: ``progress(event)``: ``{"event": "progress", "epoch", "epochs", "done", "total", "loss"}`` per step and
#: ``{"event": "epoch", "epoch", "minutes", **the epoch's log fields}`` per epoch (rank 0 only).
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class Task:
    """What a run optimises.

    Attributes:
        net: the module called by ``step`` (wrapped in DistributedDataParallel under torchrun).
        step: ``step(net, batch) -> (loss scalar Tensor, logs {name: float})``; ``batch`` is on the device.
        modules: named modules whose state goes into the resume file (``{"model": m}``, plus e.g. ``"extra"``).
        params: the optimised parameters.
        collate: the DataLoader's ``collate_fn``.
        to_device: ``to_device(batch, device) -> batch``.
        end_epoch: rank 0, after each epoch and when the budget stops a run: ``end_epoch(state, means, stopped)
            -> {column: value}`` for the CSV row and the epoch event (evaluate, keep the best, save the product).
        hand_synced: parameters outside the DDP wrapper, whose gradients the loop averages across ranks itself.
        state: task-specific loop state, kept in the resume file (e.g. the best AP so far).
        stop_early: ``stop_early(state) -> bool`` after each epoch (early stopping); None: never.
        find_unused_parameters: DDP's flag (Mask R-CNN leaves its mask head unused on batches without objects).
        plot: ``plot(log_csv)`` after each epoch's row; errors only warn.
    """

    net: nn.Module
    step: Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]
    modules: dict[str, nn.Module]
    params: list[nn.Parameter]
    collate: Callable
    to_device: Callable[[Any, str], Any]
    end_epoch: Callable[[dict[str, Any], dict[str, float], bool], dict[str, Any]]
    hand_synced: list[nn.Parameter] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    stop_early: Callable[[dict[str, Any]], bool] | None = None
    find_unused_parameters: bool = False
    plot: Callable[[Path], None] | None = None


def run_loop(task: Task, dataset: torch.utils.data.Dataset, out: Path, cfg, d: Dist,
             progress: ProgressFn | None = None) -> dict[str, Any]:
    """Optimise ``task`` over ``dataset`` (``cfg``: :class:`training.train.TrainConfig`); resume from
    ``OUT.resume.safetensors`` when it exists. Returns the loop state (``epoch``, ``step``, ``seconds``, ``last``:
    the last epoch's means, and the task's own keys).

    Raises:
        InputError: the dataset is smaller than one batch per process.
        KeyboardInterrupt: after saving the resume state (Ctrl-C, or SIGTERM mapped by the CLI).
    """
    from training.train import adamw, ddp_wrap, epoch_sampler, lr_at

    resume_path = out.with_suffix(".resume.safetensors")
    log_path = out.with_suffix(".log.csv")
    opt = adamw(task.params, cfg)
    sampler, steps_per_epoch = epoch_sampler(len(dataset), cfg, d)
    total = cfg.epochs * steps_per_epoch
    state: dict[str, Any] = {"epoch": 0, "step": 0, "seconds": 0.0, "last": {}, **task.state}
    if resume_path.exists():
        state = {**state, **load_resume(resume_path, task.modules, opt)}
        log.info("resumed from %s at epoch %d step %d", resume_path, state["epoch"], state["step"])
    net = ddp_wrap(task.net, d, find_unused_parameters=task.find_unused_parameters)
    use_amp = d.device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = time.monotonic() - state["seconds"]
    last_ckpt = time.monotonic()
    stop = False
    try:
        while state["epoch"] < cfg.epochs and not stop:
            epoch = state["epoch"]
            first = state["step"] - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
            sampler.set_epoch(epoch, first)
            if hasattr(dataset, "rng"):
                dataset.rng = np.random.default_rng([cfg.seed, d.rank, epoch, first])
            loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                                 collate_fn=task.collate, num_workers=cfg.num_workers,
                                                 worker_init_fn=_seed_worker, drop_last=True)  # fmt: skip
            net.train()
            sums: dict[str, float] = {}
            n = 0
            lr = lr_at(state["step"], total, cfg, state["seconds"])
            for batch in loader:
                batch = task.to_device(batch, d.device)
                # DDP ranks step in lockstep, so their clocks (time-based decay) agree to within a step.
                lr = lr_at(state["step"], total, cfg, time.monotonic() - start)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast("cuda", enabled=use_amp):
                    loss, logs = task.step(net, batch)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_grads(d, task.hand_synced)
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(task.params, cfg.clip_norm)
                scaler.step(opt)
                scaler.update()
                state["step"] += 1
                n += 1
                for k, v in {"loss": float(loss.detach()), **logs}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                state["seconds"] = time.monotonic() - start
                if d.main:
                    if progress:
                        progress({"event": "progress", "epoch": epoch + 1, "epochs": cfg.epochs, "done": first + n,
                                  "total": steps_per_epoch, "loss": round(sums["loss"] / n, 4)})  # fmt: skip
                    if state["step"] % 20 == 0:
                        log.info("epoch %d step %d lr %.2e %s", epoch, state["step"], lr,
                                 " ".join(f"{k} {v / n:.4f}" for k, v in sums.items()))  # fmt: skip
                    if time.monotonic() - last_ckpt > cfg.checkpoint_minutes * 60:
                        save_resume(resume_path, task.modules, opt, state)
                        last_ckpt = time.monotonic()
                over = bool(cfg.max_minutes and state["seconds"] > cfg.max_minutes * 60)
                if distributed.broadcast_flag(d, over):
                    stop = True
                    break
            means = {k: distributed.all_mean(d, v / max(n, 1)) for k, v in sums.items()}
            if not stop:
                state["epoch"] += 1
            state["last"] = {k: round(v, 5) for k, v in means.items()}
            if d.main:
                row = task.end_epoch(state, means, stop)
                # A run stopped by its time budget logs the fraction of the epoch it did (e.g. 16.12).
                done = state["epoch"] + (round((first + n) / steps_per_epoch, 2) if stop else 0)
                minutes = state["seconds"] / 60
                _append_row(log_path, {"epoch": done, "step": state["step"], "lr": f"{lr:.3g}", **row,
                                       "minutes": f"{minutes:.1f}"})  # fmt: skip
                save_resume(resume_path, task.modules, opt, state)
                last_ckpt = time.monotonic()
                if task.plot is not None:
                    try:
                        task.plot(log_path)
                    except (OSError, ValueError, KeyError) as exc:  # a convenience: never stop training for it
                        log.warning("could not plot %s: %s", log_path, exc)
                if progress:
                    fields = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                    progress({"event": "epoch", "epoch": state["epoch"], **fields, "minutes": round(minutes, 2)})
            if stop:
                log.info("time budget of %.0f min reached; re-run to continue", cfg.max_minutes)
            early = task.stop_early is not None and d.main and task.stop_early(state)
            if distributed.broadcast_flag(d, early) and not stop:
                break
            distributed.barrier(d)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (the CLI maps it): keep the progress for a re-run
        if d.main and state["step"] > 0:
            save_resume(resume_path, task.modules, opt, state)
            log.info("interrupted at step %d; state saved to %s", state["step"], resume_path)
        raise
    return state


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to the CSV log; a new file gets a header, an existing one keeps its own columns.

    Raises:
        InputError: the file system refused the write (one line naming the folder and the cause).
    """
    fields = list(row)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as fh:
            fields = next(csv.reader(fh), fields)
        write_header = False
    else:
        write_header = True
    try:
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore", restval="")
            if write_header:
                writer.writeheader()
            writer.writerow(row)
    except OSError as exc:
        raise_write_error(path, exc)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "rng"):
        info.dataset.rng = np.random.default_rng(torch.initial_seed() % 2**63)


def save_resume(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, state: dict) -> None:
    """Write the resume file to a temporary file beside ``path`` and rename it into place.

    Raises:
        InputError: the file system refused the write (disk full, quota, read-only, folder removed): one line
            naming the folder and the cause; the previous resume file at ``path`` is left as it was (byte for
            byte) and no temporary file remains.
    """
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, module in modules.items() for k, v in module.state_dict().items()}  # fmt: skip
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    groups = [dict(g) for g in opt_state["param_groups"]]
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups)}
    write_safetensors(path, tensors, meta)


def load_resume(path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer) -> dict:
    """Load the modules' and the optimizer's state from a resume file; returns the loop state."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    device = next(iter(modules.values())).parameters().__next__().device
    opt_state: dict[str, Any] = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v.to(device)
    opt.load_state_dict(opt_state)
    return json.loads(meta["state"])
