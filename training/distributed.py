"""torch.distributed set-up shared by the training commands.

Launched with ``torchrun --nproc_per_node N rs-train ...`` (or ``python -m torch.distributed.run``), each process
finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; without them everything runs in one process.
The backend is NCCL when the processes use CUDA, gloo on CPU. Only rank 0 writes files (model, resume state, logs,
plots); every rank reads the resume state, so a re-run of the same command resumes all of them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` in ``0..world_size-1``; ``device`` to put its model on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun; ``device`` is ``cpu`` or ``cuda`` (the local GPU is
    picked by ``LOCAL_RANK``). Validation runs on rank 0 alone, so the collective timeout is generous (2 h)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return Dist(rank, world, local, device)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (so all processes stop at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=d.device if d.device.startswith("cuda") else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def all_mean(d: Dist, value: float) -> float:
    """Mean of ``value`` over ranks (e.g. the epoch's loss)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device if d.device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def average_grads(d: Dist, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of parameters that DistributedDataParallel does not manage (e.g. an extra loss's
    projections) over ranks, so every rank takes the same optimizer step."""
    if not d.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world_size


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
