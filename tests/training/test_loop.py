"""The one training loop (training/loop.py) on a tiny task: what every run type now shares."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from training.distributed import Dist
from training.loop import Task, run_loop
from training.train import TrainConfig

SOLO = Dist()


class Noisy(torch.utils.data.Dataset):
    """Items ``x + noise`` whose noise comes from the ``rng`` attribute the loop reseeds per epoch."""

    def __init__(self, n: int = 8, seed: int = 0):
        self.x = torch.linspace(-1, 1, n)
        self.rng = np.random.default_rng(seed)
        self.seen: list[float] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        noise = float(self.rng.normal())
        self.seen.append(noise)
        return torch.stack([self.x[i], torch.tensor(noise)])


def task_for(model: nn.Linear, saved: list, interrupt_at: int | None = None) -> Task:
    def step(net, batch):
        if interrupt_at is not None and len(saved) == 0 and step.calls == interrupt_at:
            raise KeyboardInterrupt
        step.calls += 1
        loss = ((net(batch[:, :1]) - 3 * batch[:, :1]) ** 2).mean()
        return loss, {"noise": float(batch[:, 1].abs().mean())}

    step.calls = 0

    def end_epoch(state, means, stopped):
        saved.append(state["step"])
        return {"loss": round(means["loss"], 5), "noise": round(means["noise"], 5)}

    return Task(net=model, step=step, modules={"model": model}, params=list(model.parameters()),
                collate=torch.stack, to_device=lambda b, device: b.to(device), end_epoch=end_epoch)  # fmt: skip


def test_loop_trains_logs_reseeds_and_resumes(tmp_path) -> None:
    torch.manual_seed(0)
    out = tmp_path / "m.safetensors"
    cfg = TrainConfig(epochs=2, batch_size=2, lr=0.05, warmup_steps=1, num_workers=0, checkpoint_minutes=0)
    data, saved = Noisy(), []
    events = []
    state = run_loop(task_for(nn.Linear(1, 1), saved), data, out, cfg, SOLO, events.append)
    assert state["epoch"] == 2 and state["step"] == 8 and saved == [4, 8]
    rows = list(csv.DictReader(open(out.with_suffix(".log.csv"))))
    assert list(rows[0]) == ["epoch", "step", "lr", "loss", "noise", "minutes"]
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    # The dataset's rng is reseeded per epoch (cfg.seed, rank, epoch, first batch): the two epochs draw other
    # noise, and a run whose dataset was built with another seed draws the same.
    assert data.seen[:8] != data.seen[8:16]
    again = Noisy(seed=99)
    run_loop(task_for(nn.Linear(1, 1), []), again, tmp_path / "other.safetensors", cfg, SOLO)
    assert again.seen == data.seen

    # Finished: re-running does nothing; more epochs continue from the resume file, the log keeps its header.
    assert run_loop(task_for(nn.Linear(1, 1), saved), Noisy(), out, cfg, SOLO)["step"] == 8
    cfg.epochs = 3
    assert run_loop(task_for(nn.Linear(1, 1), saved), Noisy(), out, cfg, SOLO)["step"] == 12
    rows = list(csv.DictReader(open(out.with_suffix(".log.csv"))))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_interrupt_saves_the_resume_state_and_a_rerun_continues_mid_epoch(tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.05, warmup_steps=1, num_workers=0)
    with pytest.raises(KeyboardInterrupt):
        run_loop(task_for(nn.Linear(1, 1), [], interrupt_at=3), Noisy(), out, cfg, SOLO)
    with safe_open(str(out.with_suffix(".resume.safetensors")), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 3
    events = []
    run_loop(task_for(nn.Linear(1, 1), []), Noisy(), out, cfg, SOLO, events.append)
    assert [e["done"] for e in events if e["event"] == "progress"] == [4, 5, 6, 7, 8]
    assert not list(tmp_path.glob("*.tmp"))
