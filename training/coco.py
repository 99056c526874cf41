"""COCO instance datasets (polygons or RLE) as fixed-size training chips for Mask R-CNN.

Each item is one chip of ``chip_size`` x ``chip_size`` pixels cut from an image (random position for training,
images smaller than a chip padded with the band mean, i.e. 0 after normalisation), normalised per band, with the
instances that fall in it: ``(image (C, S, S) float32, target dict(boxes (K, 4) x1y1x2y2 px, labels (K,) int64
1..num_classes, masks (K, S, S) uint8))``. Instances cut by the chip edge keep their visible part; slivers
smaller than ``min_visible`` of their area (or 4 px) are dropped.

Labels are the dataset's categories sorted by id, mapped to 1..K (0 is background), as the model card records.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from rasterio.windows import Window

from rs_engine.errors import InputError
from rs_engine.raster import RasterSource
from training.augment import AugmentConfig, augment, crop_size, make_target, resize
from training.bandstats import BandStatistics

log = logging.getLogger(__name__)


@dataclass
class ChipSpec:
    """How chips are cut: size in pixels, bands kept (0-based indexes into the image), normalisation."""

    size: int
    bands: list[int]
    mean: list[float]
    std: list[float]


class CocoChips(torch.utils.data.Dataset):
    """Chips from a COCO instance JSON + image folder.

    Args:
        annotations: COCO JSON path.
        images: folder the ``file_name`` entries are relative to.
        spec: chip size, bands and normalisation.
        train: random chip positions and augmentation (:mod:`training.augment`); otherwise one chip per
            image at the top-left corner (use whole-image evaluation for metrics instead).
        chips_per_image: how many random chips one epoch takes from each image (training).
        augment: augmentation settings (default :class:`AugmentConfig`).

    Raises:
        InputError: the JSON or an image is missing or unreadable.
    """

    def __init__(self, annotations: str | Path, images: str | Path, spec: ChipSpec, train: bool = True,
                 chips_per_image: int = 1, seed: int = 0, augment: AugmentConfig | None = None) -> None:
        annotations, self.images = Path(annotations), Path(images)
        if not annotations.is_file():
            raise InputError(f"{annotations}: COCO annotation file not found")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            self.coco = COCO(str(annotations))
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.ids = sorted(self.coco.getImgIds())
        self.spec, self.train, self.chips_per_image = spec, train, chips_per_image
        self.rng = np.random.default_rng(seed)
        self.augment = augment or AugmentConfig()

    def __len__(self) -> int:
        return len(self.ids) * (self.chips_per_image if self.train else 1)

    def load_image(self, image_id: int) -> np.ndarray:
        """(C, H, W) float32 in the image's own units, bands as ``spec.bands``, read by
        :class:`rs_engine.raster.RasterSource` as inference reads it (nodata pixels 0).

        A single-band image given to a multi-band spec of the first bands is repeated into them (SAR, grey
        photos), as inference does; any other missing band is an error.

        Raises:
            InputError: the image is missing or unreadable, or lacks a band of ``spec.bands``.
        """
        info = self.coco.imgs[image_id]
        n = len(self.spec.bands)
        bands = None if self.spec.bands == list(range(n)) else [b + 1 for b in self.spec.bands]
        with RasterSource(self.images / info["file_name"], n, bands=bands, resample=False,
                          label="the training chips") as src:
            data, _ = src.read_window(Window(0, 0, src.width, src.height))
        return data

    def instances(self, image_id: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, H, W) uint8 masks and (K,) labels of one image (crowd regions skipped)."""
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd")]
        masks = np.zeros((len(anns), height, width), np.uint8)
        labels = np.zeros(len(anns), np.int64)
        for i, a in enumerate(anns):
            seg = a["segmentation"]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if isinstance(seg, list) else seg
            masks[i] = mask_utils.decode(rle)
            labels[i] = self.label_of[a["category_id"]]
        return masks, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index % len(self.ids)]
        img = self.load_image(image_id)
        _, h, w = img.shape
        masks, labels = self.instances(image_id, h, w)
        s = self.spec.size
        c = crop_size(s, self.rng, self.augment) if self.train else s
        y0 = int(self.rng.integers(0, h - c + 1)) if self.train and h > c else 0
        x0 = int(self.rng.integers(0, w - c + 1)) if self.train and w > c else 0
        mean = np.asarray(self.spec.mean, np.float32)[:, None, None]
        std = np.asarray(self.spec.std, np.float32)[:, None, None]
        chip = np.zeros((img.shape[0], c, c), np.float32)  # padding = band mean -> 0 after normalisation
        crop = img[:, y0:y0 + c, x0:x0 + c]
        chip[:, : crop.shape[1], : crop.shape[2]] = (crop - mean) / std
        cm = np.zeros((len(masks), c, c), np.uint8)
        cm[:, : crop.shape[1], : crop.shape[2]] = masks[:, y0:y0 + c, x0:x0 + c]
        full = masks.reshape(len(masks), -1).sum(1)
        seen = cm.reshape(len(cm), -1).sum(1)
        keep = (seen >= 4) & (seen >= 0.2 * np.maximum(full, 1))
        cm, labels = cm[keep], labels[keep]
        if self.train:
            chip, cm = resize(chip, cm, s)
            chip, cm = augment(chip, cm, self.rng, self.augment)
        return torch.from_numpy(np.ascontiguousarray(chip)), make_target(cm, labels)


def band_statistics(dataset: CocoChips, max_images: int = 200) -> tuple[list[float], list[float]]:
    """Per-band mean and std (image units) over up to ``max_images`` images, for the model card."""
    stats = BandStatistics()
    for image_id in dataset.ids[:max_images]:
        img = dataset.load_image(image_id)
        stats.add(img.reshape(len(img), -1))
    return stats.result()
