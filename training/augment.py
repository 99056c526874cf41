"""Chip augmentation for overhead imagery, shared by every training dataset.

Overhead images have no "up" and come at many GSDs and radiometries, so training chips get:

- geometric: one of the 8 dihedral transforms (90-degree rotations x horizontal flip), same for image and masks;
- scale jitter: the chip is cut from a window ``size / s`` pixels wide and resized to ``size`` (image bilinear,
  masks nearest), ``s`` log-uniform in ``scale_range``; objects then appear at several GSDs around the training one;
- photometric: per band, ``x' = x * (1 + g) + b`` on the normalised values (``g ~ U(-gain, gain)``,
  ``b ~ U(-bias, bias)``), i.e. independent gain and offset jitter per band, as sensor calibration and
  atmosphere vary band by band.

All functions take and return numpy arrays: chips (C, H, W) float32 normalised, masks (K, H, W) uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Augmentation settings; ``AugmentConfig(scale_range=(1, 1), gain=0, bias=0, dihedral=False)`` disables all."""

    scale_range: tuple[float, float] = (0.8, 1.25)
    gain: float = 0.15
    bias: float = 0.15
    dihedral: bool = True


def crop_size(size: int, rng: np.random.Generator, cfg: AugmentConfig) -> int:
    """Side in source pixels of the window to cut for a ``size`` px chip (scale jitter; ``size`` when off)."""
    lo, hi = cfg.scale_range
    if lo == hi == 1:
        return size
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return max(8, round(size / s))


def resize(chip: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a (C, h, w) chip (bilinear) and its (K, h, w) masks (nearest) to ``size`` x ``size``."""
    if chip.shape[1:] == (size, size):
        return chip, masks
    img = F.interpolate(torch.from_numpy(np.ascontiguousarray(chip))[None], size=(size, size), mode="bilinear",
                        align_corners=False)[0].numpy()
    if len(masks):
        masks = F.interpolate(torch.from_numpy(np.ascontiguousarray(masks))[None].float(), size=(size, size),
                              mode="nearest")[0].to(torch.uint8).numpy()
    else:
        masks = np.zeros((0, size, size), np.uint8)
    return img, masks


def dihedral(chip: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 rotations/flips of the square, the same for image and masks."""
    k = int(rng.integers(0, 4))
    chip, masks = np.rot90(chip, k, axes=(1, 2)), np.rot90(masks, k, axes=(1, 2))
    if rng.random() < 0.5:
        chip, masks = chip[:, :, ::-1], masks[:, :, ::-1]
    return chip, masks


def photometric(chip: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
                valid: np.ndarray | None = None) -> np.ndarray:
    """Per-band gain and offset jitter on normalised values; pixels where ``valid`` (H, W) is False stay 0."""
    if cfg.gain == 0 and cfg.bias == 0:
        return chip
    c = chip.shape[0]
    g = 1.0 + rng.uniform(-cfg.gain, cfg.gain, size=(c, 1, 1)).astype(np.float32)
    b = rng.uniform(-cfg.bias, cfg.bias, size=(c, 1, 1)).astype(np.float32)
    out = chip * g + b
    if valid is not None:
        out = np.where(valid[None], out, 0.0).astype(np.float32)
    return out


def augment(chip: np.ndarray, masks: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig,
            valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dihedral transform then photometric jitter (scale jitter happens when the chip is cut, see
    :func:`crop_size` and :func:`resize`). ``valid`` (H, W) bool marks pixels that carry data."""
    if cfg.dihedral:
        if valid is not None:
            stacked = np.concatenate([masks, valid[None].astype(np.uint8)])
            chip, stacked = dihedral(chip, stacked, rng)
            masks, valid = stacked[:-1], stacked[-1].astype(bool)
        else:
            chip, masks = dihedral(chip, masks, rng)
    chip = photometric(chip, rng, cfg, valid)
    return np.ascontiguousarray(chip, dtype=np.float32), np.ascontiguousarray(masks)


def make_target(masks: np.ndarray, labels: np.ndarray, min_pixels: int = 4) -> dict[str, torch.Tensor]:
    """Mask R-CNN target from (K, S, S) uint8 masks and (K,) labels 1..num_classes.

    Masks with fewer than ``min_pixels`` pixels (slivers left by cropping or resizing) are dropped.

    Returns:
        ``{"boxes": (K', 4) float32 x1, y1, x2, y2 px, "labels": (K',) int64, "masks": (K', S, S) uint8}``.
    """
    keep = masks.reshape(len(masks), -1).sum(1) >= min_pixels if len(masks) else np.zeros(0, bool)
    masks, labels = masks[keep], labels[keep]
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys = np.flatnonzero(m.any(1))
        xs = np.flatnonzero(m.any(0))
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    size = masks.shape[1:] if masks.ndim == 3 else (0, 0)
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "masks": torch.from_numpy(np.ascontiguousarray(masks)).reshape(len(masks), *size),
    }
