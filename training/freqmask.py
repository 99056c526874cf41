"""Frequency-masked self-supervised pretraining (``rs-train pretrain --method freq-mask``), after RS-vHeat.

RS-vHeat (Hu et al. 2025, seed 001, ../shared/REFERENCES.md) pretrains without labels by masking radial bands of
the DCT spectrum -- a low band or a high band, different bands at different pyramid levels -- and reconstructing in
the spatial and the frequency domains. Its code is not public; this is our concrete version of it, written for
any hierarchical backbone of :mod:`rs_engine.models` (heat or SSM):

Spectra and bands. For a grid of H x W values (image or feature map, per channel) let ``X = DCT2(x)``
(orthonormal DCT-II, :mod:`rs_engine.ops.dct`) and give each coefficient its normalised radial frequency::

    rho(n, m) = sqrt((n / H)^2 + (m / W)^2) / sqrt(2)          in [0, 1)

A *band mask* keeps or drops every coefficient of a ring ``lo <= rho < hi`` and is applied as
``x' = IDCT2(DCT2(x) * (1 - M))``. The DC term (rho = 0, the mean) is never dropped.

Hierarchical masking. Masks act at the input image and at the entry of each pyramid level of the backbone
(``l = 0..3``: the stem's stride-4 output and the outputs of the three stride-2 downsamplings, through forward
hooks), each on its own grid, so what is lost at one level must be inferred from what the others keep:

* image: per chip, a low band ``0 < rho < c`` or a high band ``c <= rho < 1`` (probability 1/2 each), the cutoff
  ``c ~ U(image_low)`` or ``U(image_high)``;
* level l: with probability ``level_prob`` per chip a band of the level's own spectrum is dropped -- the *high* band
  ``c <= rho < 1``, ``c ~ U(level_high)``, at the fine levels (strides 4 and 8, which carry texture and edges), the
  *low* band ``0 < rho < c``, ``c ~ U(level_low)``, at the coarse levels (strides 16 and 32, which carry layout);
  on a grid too coarse for the drawn band, at least its lowest non-DC (low band) or highest (high band) mode.

Multi-domain reconstruction. A light decoder (1x1 projections of the 4 levels to ``decoder_dim`` channels, upsampled
to stride 4 and summed, a 3x3 conv + GELU, a 1x1 conv to ``16 C`` channels and a 4x pixel shuffle) predicts the
unmasked chip ``x`` (B, C, S, S) as ``x_hat``. The loss::

    L = mean|x_hat - x|  +  lambda_f * sum(w * |DCT2(x_hat) - DCT2(x)|) / sum(w),   w = 1 + beta * M_image

is an L1 in the pixel domain plus an L1 on the DCT coefficients weighted towards the image's dropped band
(``M_image`` = 1 there), as masked image modelling scores the masked part (He et al. 2022, MAE). An L2 in the
frequency domain would repeat the pixel L2 (Parseval: the orthonormal DCT keeps the sum of squares), so both terms
are L1: the frequency term spreads the penalty evenly over the spectrum, whose low frequencies dominate the energy
of natural and SAR images, so the network cannot ignore the fine detail a pixel loss under-weights.

Only the backbone is kept (:func:`training.pretrain.save_backbone`); the decoder is discarded after pretraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rs_engine.ops import dct2, idct2


@dataclass
class FreqMaskConfig:
    """Settings of the frequency-masked objective (see the module docstring for the equations).

    Attributes:
        image_low: range of the cutoff ``c`` of an image low-band mask (``0 < rho < c`` dropped).
        image_high: range of the cutoff of an image high-band mask (``c <= rho < 1`` dropped).
        level_prob: probability that a pyramid level masks a band of its features, per chip.
        level_high: cutoff range of the high band dropped at the fine levels (strides 4, 8).
        level_low: cutoff range of the low band dropped at the coarse levels (strides 16, 32).
        fine_levels: how many of the first levels count as fine (the others drop low bands).
        decoder_dim: channels of the light decoder.
        freq_weight: ``lambda_f``, weight of the frequency-domain loss.
        masked_weight: ``beta``, extra weight of the image's dropped band in the frequency loss.
    """

    image_low: tuple[float, float] = (0.02, 0.12)
    image_high: tuple[float, float] = (0.08, 0.35)
    level_prob: float = 0.5
    level_high: tuple[float, float] = (0.3, 0.7)
    level_low: tuple[float, float] = (0.05, 0.3)
    fine_levels: int = 2
    decoder_dim: int = 64
    freq_weight: float = 1.0
    masked_weight: float = 2.0


def radial_frequency(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(H, W) normalised radial frequency ``rho = sqrt((n/H)^2 + (m/W)^2) / sqrt(2)`` of DCT coefficient (n, m)."""
    n = torch.arange(h, device=device, dtype=torch.float32) / h
    m = torch.arange(w, device=device, dtype=torch.float32) / w
    return torch.sqrt(n[:, None] ** 2 + m[None, :] ** 2) / math.sqrt(2)


def band_mask(rho: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """(B, 1, H, W) float mask, 1 where ``lo[b] <= rho < hi[b]`` (the dropped band), DC never dropped.

    Args:
        rho: (H, W) from :func:`radial_frequency`.
        lo, hi: (B,) band edges per chip.
    """
    r = rho[None, None]
    m = (r >= lo[:, None, None, None]) & (r < hi[:, None, None, None])
    m[..., 0, 0] = False
    return m.float()


def drop_band(x: Tensor, mask: Tensor) -> Tensor:
    """``IDCT2(DCT2(x) * (1 - mask))`` over the last two dims: x (B, C, H, W), mask (B, 1, H, W)."""
    return idct2(dct2(x) * (1 - mask))


class LightDecoder(nn.Module):
    """4 feature maps (strides 4..32) -> (B, out_channels, 4 h0, 4 w0), h0 x w0 the stride-4 grid.

    1x1 projections to ``dim`` channels, bilinear upsampling to stride 4 and a sum (an FPN without its top-down
    path), 3x3 conv + GELU, 1x1 conv to ``16 * out_channels`` and a 4x pixel shuffle (Shi et al. 2016).
    """

    def __init__(self, in_channels: list[int], out_channels: int, dim: int = 64) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, 16 * out_channels, 1))

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        y = sum(F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size
                else p(f) for p, f in zip(self.proj, feats))
        return F.pixel_shuffle(self.fuse(y), 4)


def level_entries(body: nn.Module) -> list[nn.Module]:
    """The modules whose outputs enter the pyramid levels: the stem (``patch_embed``) and, in hierarchical
    backbones, the stride-2 ``downsamples`` -- the layout shared by :class:`rs_engine.models.ssm.SSMBackbone` and
    :class:`rs_engine.models.heat.HeatBackbone`."""
    entries = [body.patch_embed]
    if hasattr(body, "downsamples"):
        entries += list(body.downsamples)
    return entries


class FreqMaskObjective(nn.Module):
    """Backbone + light decoder; ``forward(batch) -> (loss, logs)`` for :func:`training.pretrain.run_pretraining`.

    Args:
        body: a backbone body (``build_backbone(config)``): (B, C, S, S) -> OrderedDict "0".."3".
        in_channels: C, the bands of the chips.
        cfg: the masking and loss settings.
        seed: seeds the mask generator (add the DDP rank so that ranks draw different masks).

    ``batch["image"]`` is (B, C, S, S), normalised, S a multiple of 32. Logs: ``pix`` (pixel L1), ``freq``
    (weighted frequency L1), ``masked_pix`` (pixel L1 of the image's dropped band alone, i.e. of
    ``IDCT2(DCT2(x_hat - x) * M)``, the part that cannot be copied from the input).
    """

    def __init__(self, body: nn.Module, in_channels: int, cfg: FreqMaskConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg or FreqMaskConfig()
        self.backbone = body
        self.decoder = LightDecoder(list(body.out_channels_list), in_channels, self.cfg.decoder_dim)
        self.generator = torch.Generator().manual_seed(seed)
        self._level_masks: list[tuple[Tensor, Tensor] | None] = []
        for level, module in enumerate(level_entries(body)):
            module.register_forward_hook(self._make_hook(level))

    def _uniform(self, n: int, bounds: tuple[float, float]) -> Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(n, generator=self.generator)

    def _make_hook(self, level: int):  # noqa: ANN202
        def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
            bands = self._level_masks[level] if level < len(self._level_masks) else None
            if bands is None:  # not inside this objective's forward (e.g. evaluation of the body): unchanged
                return None
            lo, hi = (t.to(out.device) for t in bands)
            rho = radial_frequency(*out.shape[-2:], device=out.device)
            # On a coarse grid (a 2 x 2 stride-32 map of a 64 px chip) a drawn band may fall between its few
            # modes: a chip that masks this level always loses at least the lowest non-DC mode (low band) or
            # the highest mode (high band).
            on = hi > lo
            lowest = rho[rho > 0].min() if rho.numel() > 1 else rho.new_tensor(1.0)
            hi = torch.where(on & (lo == 0), torch.maximum(hi, lowest * 1.001), hi)
            lo = torch.where(on & (lo > 0), torch.minimum(lo, rho.max()), lo)
            return drop_band(out, band_mask(rho, lo, hi))
        return hook

    def draw_masks(self, b: int) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """Per-chip band edges: image ``(lo, hi)`` (B,) each, and one ``(lo, hi)`` pair per pyramid level
        (chips that do not mask a level get an empty band ``lo = hi = 0``)."""
        c = self.cfg
        low = torch.rand(b, generator=self.generator) < 0.5
        cut_low, cut_high = self._uniform(b, c.image_low), self._uniform(b, c.image_high)
        img_lo = torch.where(low, torch.zeros(b), cut_high)
        img_hi = torch.where(low, cut_low, torch.full((b,), 2.0))
        levels = []
        for level in range(len(level_entries(self.backbone))):
            on = torch.rand(b, generator=self.generator) < c.level_prob
            if level < c.fine_levels:
                lo, hi = self._uniform(b, c.level_high), torch.full((b,), 2.0)
            else:
                lo, hi = torch.zeros(b), self._uniform(b, c.level_low)
            levels.append((torch.where(on, lo, 0.0), torch.where(on, hi, 0.0)))
        return img_lo, img_hi, levels

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x = batch["image"]
        b, _, h, w = x.shape
        img_lo, img_hi, levels = self.draw_masks(b)
        rho = radial_frequency(h, w, x.device)
        m_img = band_mask(rho, img_lo.to(x.device), img_hi.to(x.device))
        spec = dct2(x)
        x_in = idct2(spec * (1 - m_img))
        self._level_masks = levels
        try:
            feats = self.backbone(x_in)
        finally:
            self._level_masks = []
        x_hat = self.decoder(list(feats.values()))[..., :h, :w]
        err = dct2(x_hat) - spec
        pix = (x_hat - x).abs().mean()
        weight = 1 + self.cfg.masked_weight * m_img
        freq = (err.abs() * weight).sum() / (weight.sum() * x.shape[1])
        loss = pix + self.cfg.freq_weight * freq
        with torch.no_grad():
            masked_pix = idct2(err * m_img).abs().mean()
        return loss, {"pix": float(pix.detach()), "freq": float(freq.detach()), "masked_pix": float(masked_pix)}
