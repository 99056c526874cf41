"""Per-band mean and standard deviation of training pixels, for the model card's normalisation.

One place for it: COCO folders (:mod:`training.coco`), georeferenced annotations (:mod:`training.local`) and
label-free imagery (:mod:`training.pretrain`) all feed their valid pixels here, so every card is normalised the
same way.
"""

from __future__ import annotations

import numpy as np

#: Floor of the variance (raw units squared): a constant band gets std 1e-3, not a division by zero.
MIN_VARIANCE = 1e-6


class BandStatistics:
    """Running per-band mean and std over batches of pixels.

    Sums are shifted by the first batch's mean, so the variance stays exact for large raw values (uint16 or
    float32 reflectance with an offset), where the textbook ``E[x^2] - E[x]^2`` loses every digit.
    """

    def __init__(self) -> None:
        self._shift: np.ndarray | None = None
        self._sums: np.ndarray | None = None
        self._sqs: np.ndarray | None = None
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        """Add ``values`` (C, N): N valid pixels of C bands (raw units). An empty batch is ignored."""
        values = np.asarray(values, np.float64)
        if values.ndim != 2:
            raise ValueError(f"values must be (bands, pixels), got shape {values.shape}")
        if not values.shape[1]:
            return
        if self._shift is None:
            self._shift = values.mean(axis=1, keepdims=True)
            self._sums, self._sqs = np.zeros(len(values)), np.zeros(len(values))
        d = values - self._shift
        self._sums += d.sum(axis=1)
        self._sqs += (d * d).sum(axis=1)
        self.count += values.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` per band, std at least ``sqrt(MIN_VARIANCE)``.

        Raises:
            ValueError: no pixel was added.
        """
        if not self.count:
            raise ValueError("no pixel to compute band statistics from")
        m = self._sums / self.count
        mean = self._shift[:, 0] + m
        std = np.sqrt(np.maximum(self._sqs / self.count - m * m, MIN_VARIANCE))
        return [float(v) for v in mean], [float(v) for v in std]
