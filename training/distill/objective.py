"""The ``rs-train distill`` objective: a student backbone learns a frozen teacher's features (RS4D, seed 000), with
noise and patch masking on its input (:class:`training.distill.losses.Perturbation`) and optionally dual relation
distillation (DRD, seed 002). It is an objective for :func:`training.pretrain.run_pretraining`: ``forward(batch)
-> (loss, logs)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rs_engine.errors import InputError
from training.distill.drd import DRDLoss
from training.distill.losses import Perturbation, PerturbConfig, Projection, feature_l1, whiten
from training.distill.teachers import Teacher

log = logging.getLogger(__name__)

#: Strides (px) of a student body's levels "0".."3" (:func:`rs_engine.models.build.build_backbone`).
STUDENT_STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32}


def match_levels(teacher_strides: dict[str, int], student_strides: dict[str, int] = STUDENT_STRIDES
                 ) -> list[tuple[str, str]]:
    """Pair every teacher feature with the student level of the nearest stride (in log scale):
    ``[(student level, teacher name), ...]``. E.g. SAM's stride-16 ``neck`` -> student level ``"2"``."""
    pairs = []
    for name, s in teacher_strides.items():
        level = min(student_strides, key=lambda k: abs(math.log2(student_strides[k] / s)))
        pairs.append((level, name))
    return pairs


def teacher_input(teacher: Teacher, data_mean: Sequence[float], data_std: Sequence[float]
                  ) -> tuple[int, Tensor, Tensor]:
    """How chips normalised with the data's statistics become the teacher's input: ``(repeat, a, b)`` with
    ``x_teacher = repeat_bands(x) * a + b`` = (pixel - teacher mean) / teacher std; a, b (1, C_t, 1, 1).
    One band is repeated into a 3-band teacher (SAR into an RGB network).

    Raises:
        InputError: the band counts cannot be matched.
    """
    bands = len(data_mean)
    if teacher.in_channels != bands and not (bands == 1 and teacher.in_channels > 1):
        raise InputError(f"the teacher ({teacher.label}) takes {teacher.in_channels} bands, the chips have "
                         f"{bands}: choose --bands to match")
    repeat = teacher.in_channels if bands == 1 and teacher.in_channels > 1 else 1
    mean_d, std_d = torch.tensor(list(data_mean)).repeat(repeat), torch.tensor(list(data_std)).repeat(repeat)
    mean_t, std_t = torch.tensor(teacher.mean), torch.tensor(teacher.std)
    return repeat, (std_d / std_t).view(1, -1, 1, 1), ((mean_d - mean_t) / std_t).view(1, -1, 1, 1)


class DistillObjective(nn.Module):
    """Student body + projections (+ DRD projections) trained to match a frozen teacher.

    For a batch of normalised chips x (B, C, S, S) with dataset indices i (B,):

        t_l  = teacher(x as the teacher expects it)_l                (no gradient; cached on disk when asked)
        x'   = perturb(x; sigma_i, rho_i)                            (noise + patch masking, per chip)
        e_i  = mean_l L1(P_l(student(x')_{m(l)}), whiten(t_l))_i     (P_l: 1x1 conv + resize; m(l): nearest stride)
        loss = mean_i e_i + drd_weight * DRD(student levels, teacher maps)

    and e_i drives the adaptive rule. The teacher is held outside the module's parameters and state (``.teacher``
    is not a submodule): it is never optimised, never written to the resume file, and moved to the batch's device
    on first use.

    Args:
        student: a backbone body ``(B, C, S, S) -> {"0".."3"}`` (:func:`rs_engine.models.build.build_backbone`).
        teacher: a frozen :class:`training.distill.teachers.Teacher`.
        data_mean, data_std: the chips' per-band normalisation (image units), to renormalise for the teacher.
        num_chips: dataset length (the adaptive rule's per-chip memory).
        cache_dir: folder for teacher features, one file per chip index (chips must be deterministic per index,
            as :class:`training.pretrain.UnlabelledChips` are); None: no cache.

    Raises:
        InputError: the chips' band count does not fit the teacher.
    """

    def __init__(self, student: nn.Module, teacher: Teacher, data_mean: Sequence[float], data_std: Sequence[float],
                 num_chips: int, perturb: PerturbConfig, drd_weight: float = 0.0,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not registered: no parameters, no state, no .to()
        self.repeat, scale, shift = teacher_input(teacher, data_mean, data_std)
        self.register_buffer("scale", scale, persistent=False)  # not learned, not saved (recomputed)
        self.register_buffer("shift", shift, persistent=False)
        self.pairs = match_levels(teacher.strides)
        s_channels = dict(zip(STUDENT_STRIDES, student.out_channels_list))
        self.proj = nn.ModuleDict({t: Projection(s_channels[s], teacher.channels[t]) for s, t in self.pairs})
        self.perturb = Perturbation(perturb, num_chips)
        self.drd_weight = drd_weight
        self.drd = (DRDLoss([(s_channels[s], teacher.channels[t]) for s, t in self.pairs])
                    if drd_weight > 0 else None)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------------- teacher side
    @torch.no_grad()
    def _run_teacher(self, x: Tensor) -> dict[str, Tensor]:
        t = self.teacher
        if next(t.parameters()).device != x.device:
            t.to(x.device)
        if self.repeat > 1:
            x = x.repeat(1, self.repeat, 1, 1)
        return {k: v.float() for k, v in t(x * self.scale + self.shift).items()}

    @torch.no_grad()
    def teacher_features(self, x: Tensor, index: Tensor) -> dict[str, Tensor]:
        """Teacher maps for chips x (B, C, S, S) with dataset indices (B,), from the cache where present."""
        if self.cache_dir is None:
            return self._run_teacher(x)
        from safetensors.torch import load_file, save_file

        files = [self.cache_dir / f"{int(i):08d}.safetensors" for i in index]
        have = [f.is_file() for f in files]
        fresh = {}
        todo = [j for j, h in enumerate(have) if not h]
        if todo:
            fresh = self._run_teacher(x[todo])
            for n, j in enumerate(todo):  # fp16 halves the cache; features are whitened after loading anyway
                tmp = files[j].with_name(f"{files[j].name}.{os.getpid()}.tmp")
                save_file({k: v[n].half().cpu().contiguous() for k, v in fresh.items()}, str(tmp))
                os.replace(tmp, files[j])
        out: dict[str, list[Tensor]] = {}
        for j, f in enumerate(files):
            if have[j]:
                item = {k: v.to(x.device).float() for k, v in load_file(str(f)).items()}
            else:
                item = {k: v[todo.index(j)].half().float() for k, v in fresh.items()}  # same values as cached
            for k, v in item.items():
                out.setdefault(k, []).append(v)
        return {k: torch.stack(v) for k, v in out.items()}

    # ---------------------------------------------------------------------------------------------- the loss
    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, index = batch["image"], batch["index"]
        t = self.teacher_features(x, index)
        xs, sigma, rho = self.perturb(x, index)
        feats = self.student(xs)
        errors = []
        for s, name in self.pairs:
            target = whiten(t[name])
            errors.append(feature_l1(self.proj[name](feats[s].float(), target.shape[-2:]), target))
        e = torch.stack(errors).mean(0)  # (B,) per-chip error, averaged over the teacher's levels
        loss = e.mean()
        logs = {"l1": float(loss.detach()), "noise": float(sigma.mean()), "mask": float(rho.mean())}
        if self.drd is not None:
            drd, drd_logs = self.drd([feats[s].float() for s, _ in self.pairs], [t[n] for _, n in self.pairs])
            loss = loss + self.drd_weight * drd
            logs.update(drd_logs)
        used = {s for s, _ in self.pairs}
        # Levels no teacher map pairs with (e.g. strides 4, 8, 32 under SAM) get a zero-weighted term, so every
        # parameter takes part in the graph, as DistributedDataParallel requires.
        for k, v in feats.items():
            if k not in used:
                loss = loss + 0.0 * v.float().mean()
        self.perturb.update(index, e)
        return loss, logs


def cache_key(teacher_spec: str, dataset: Any) -> str:
    """A folder name for a teacher-feature cache that changes whenever the chips or the teacher would: the
    teacher spec, chip size, bands, seed, chips per image, augmentation, and each file's name, size and time."""
    files = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in dataset.files]
    desc = {"teacher": teacher_spec, "size": dataset.size, "bands": dataset.bands, "seed": dataset.seed,
            "chips_per_image": dataset.chips_per_image, "augment": dataset.augment, "files": files,
            "mean": [float(m) for m in dataset.mean], "std": [float(s) for s in dataset.std]}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


class DRDExtraLoss(nn.Module):
    """DRD (seed 002) as an extra loss of supervised training: ``weight * DRD(student body levels, teacher maps)``,
    for :func:`training.train.train`'s ``extra_loss`` (``rs-train train|finetune --drd-teacher SPEC``).

    The student's backbone features are captured by a forward hook on ``model.backbone.body`` during the Mask R-CNN
    forward of the same step (no second student pass); the teacher (frozen, held outside this module's state) runs
    on the hooked body input, renormalised to its own statistics (:func:`teacher_input`). Only the DRD channel
    projections are trainable; they live in the resume file, never in the model file.

    Args:
        model: the Mask R-CNN being trained (:func:`rs_engine.models.build_model`).
        data_mean, data_std: per-band normalisation of the training chips (the model card's).
        weight: the loss weight W.

    Raises:
        InputError: the band counts of teacher and chips cannot be matched.
    """

    def __init__(self, model: nn.Module, teacher: Teacher, data_mean: Sequence[float], data_std: Sequence[float],
                 weight: float) -> None:
        super().__init__()
        object.__setattr__(self, "teacher", teacher)
        self.repeat, scale, shift = teacher_input(teacher, data_mean, data_std)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        body = model.backbone.body
        self.pairs = match_levels(teacher.strides)
        with torch.no_grad():
            probe = body(torch.zeros(1, len(data_mean), 64, 64))
        s_channels = {k: v.shape[1] for k, v in probe.items()}
        self.drd = DRDLoss([(s_channels[s], teacher.channels[t]) for s, t in self.pairs])
        self.weight = weight
        self.last: dict[str, float] = {}
        self._seen: tuple[Tensor, dict[str, Tensor]] | None = None
        body.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: dict[str, Tensor]) -> None:
        if module.training:
            self._seen = (inputs[0], output)

    def forward(self, model: nn.Module, images: list[Tensor]) -> Tensor:
        if self._seen is None:
            raise RuntimeError("DRDExtraLoss: the model's backbone did not run in training mode this step")
        x, feats = self._seen
        self._seen = None
        t = self.teacher
        if next(t.parameters()).device != x.device:
            t.to(x.device)
        with torch.no_grad():
            xt = x.detach().repeat(1, self.repeat, 1, 1) if self.repeat > 1 else x.detach()
            target = {k: v.float() for k, v in t(xt * self.scale + self.shift).items()}
        loss, self.last = self.drd([feats[s].float() for s, _ in self.pairs], [target[n] for _, n in self.pairs])
        return self.weight * loss
