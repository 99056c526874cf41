"""Feature distillation losses and input perturbation (RS4D, seed 000: "adaptive noise and masking distillation").

The student sees a perturbed chip (Gaussian noise plus patch masking) and must predict the teacher's features of the
clean chip through learned projections. RS4D did not publish how its noise and masking adapt; the rule here is our
own and is given with its equations in :class:`Perturbation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rs_engine.errors import InputError

MODES = ("none", "fixed", "adaptive")


def feature_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample mean absolute difference between two feature maps (RS4D's distillation loss).

    Args:
        student: (B, C, H, W) projected student features.
        teacher: (B, C, H, W) teacher features (same shape).

    Returns:
        (B,) mean |student - teacher| over C, H, W of each sample (feature units).

    Raises:
        ValueError: the shapes differ.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ")
    return (student - teacher).abs().flatten(1).mean(1)


def whiten(features: Tensor, eps: float = 1e-6) -> Tensor:
    """Parameter-free layer norm over channels at each position: (B, C, H, W) -> (B, C, H, W).

    Teacher levels differ in scale by orders of magnitude (EfficientNet's stride-32 activations vs stride-4);
    whitening each position's feature vector puts every level on one scale so that one L1 weight fits all, as in
    feature distillation with whitened targets (Wei et al. 2022, "Contrastive learning rivals masked image modeling
    in fine-tuning via feature distillation").
    """
    return F.layer_norm(features.permute(0, 2, 3, 1), features.shape[1:2], eps=eps).permute(0, 3, 1, 2)


class Projection(nn.Module):
    """Student features into a teacher's feature space: 1x1 convolution, then bilinear resize.

    (B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t). Used only during distillation; never saved with the backbone.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.conv(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


@dataclass
class PerturbConfig:
    """Student-input perturbation settings (units: noise in per-band standard deviations of the normalised chip,
    mask ratio as the share of ``patch`` x ``patch`` pixel patches set to 0, the band mean).

    Attributes:
        mode: ``none`` (clean input), ``fixed`` (``sigma`` and ``mask_ratio`` for every chip) or ``adaptive``
            (:class:`Perturbation`'s rule around those base values).
        sigma: base noise standard deviation sigma_0.
        mask_ratio: base mask ratio rho_0 (RS4D's settings are named like 20/20: 0.2 and 0.2).
        sigma_max, mask_max: upper bounds of the adaptive values.
        gamma: strength of the per-chip response (0 = none).
        gamma_global: strength of the response to the student's progress (0 = none; both 0 = fixed).
        momentum: EMA momentum beta of the running mean error.
        patch: side of a masked patch in pixels (32: one cell of the student's coarsest level).
    """

    mode: str = "adaptive"
    sigma: float = 0.2
    mask_ratio: float = 0.2
    sigma_max: float = 0.6
    mask_max: float = 0.6
    gamma: float = 1.0
    gamma_global: float = 1.0
    momentum: float = 0.98
    patch: int = 32

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--perturb {self.mode}: use one of {', '.join(MODES)}")
        if not (0 <= self.mask_ratio <= self.mask_max < 1) or not (0 <= self.sigma <= self.sigma_max):
            raise InputError(f"perturbation: need 0 <= mask ratio {self.mask_ratio} <= max {self.mask_max} < 1 "
                             f"and 0 <= noise {self.sigma} <= max {self.sigma_max}")


class Perturbation(nn.Module):
    """Noise and patch masking of the student's input, fixed or adaptive per chip.

    Adaptive rule (our design; RS4D names adaptive noise and masking but did not publish its rule). It has two
    factors: a global one, the student's progress (its running mean error ebar against its first error e_0), and a
    per-chip one (chip i's last recorded error e_i against ebar); errors are mean L1 over the projected features,
    :func:`feature_l1`:

        g        = (ebar / e_0)^(-gamma_g)              (progress: 1 at the start, 2 once the error halved, gamma_g = 1)
        r_i      = e_i / ebar                           (r_i = 1 for a chip not seen yet)
        sigma_i  = clip(sigma_0 * g * r_i^(-gamma), 0, sigma_max)
        rho_i    = clip(rho_0   * g * r_i^(-gamma), 0, rho_max)

    and after each step, for every chip j in the batch (all ranks' chips under DDP, so all ranks agree):

        e_j  <- error of chip j at this step
        ebar <- beta * ebar + (1 - beta) * mean_j(e_j)      (ebar and e_0 start at the first batch's mean)

    The global factor is a curriculum: as the student learns (ebar falls below e_0) every chip gets more noise and
    masking, so it acts from the first pass over the data, where no chip has a history yet. The per-chip factor
    acts from the second pass: a chip the student already matches well (r_i < 1) is made harder, and a chip it
    still gets wrong (r_i > 1) is shown cleaner. Since errors are measured on the perturbed input, both loops are
    negative feedbacks: hardening raises the next error, which eases the perturbation again, so the level tracks
    what the student can currently take instead of a schedule fixed in advance; the caps keep at least
    1 - rho_max of every chip visible. Chips are identified by their dataset index, which is stable because
    distillation chips are deterministic per index (the teacher-feature cache relies on it too).

    Buffers ``errors`` (N,) (NaN = unseen), ``running`` and ``initial`` (scalars, NaN = unset) are part of the
    objective's state, so a resumed run continues the same curriculum.
    """

    def __init__(self, cfg: PerturbConfig, num_chips: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("errors", torch.full((num_chips,), float("nan")))
        self.register_buffer("running", torch.tensor(float("nan")))
        self.register_buffer("initial", torch.tensor(float("nan")))

    def levels(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Noise sigma (B,) and mask ratio rho (B,) for the chips ``index`` (B,) int64."""
        c = self.cfg
        b = index.shape[0]
        if c.mode == "none":
            zero = torch.zeros(b, device=index.device)
            return zero, zero.clone()
        sigma = torch.full((b,), c.sigma, device=index.device)
        rho = torch.full((b,), c.mask_ratio, device=index.device)
        if c.mode == "fixed" or torch.isnan(self.running):
            return sigma, rho
        ebar = self.running.clamp_min(1e-12)
        progress = (ebar / self.initial.clamp_min(1e-12)).clamp_min(1e-6).pow(-c.gamma_global).to(index.device)
        e = self.errors[index.to(self.errors.device)].to(index.device)
        r = torch.where(torch.isnan(e), torch.ones_like(e), e / ebar.to(index.device))
        scale = progress * r.clamp_min(1e-6).pow(-c.gamma)
        return (sigma * scale).clamp(0, c.sigma_max), (rho * scale).clamp(0, c.mask_max)

    @torch.no_grad()
    def update(self, index: Tensor, error: Tensor) -> None:
        """Record this step's per-chip errors ``error`` (B,) for chips ``index`` (B,); gathered over DDP ranks."""
        index, error = index.detach().to(self.errors.device), error.detach().float().to(self.errors.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank needs every chip's error so the (broadcast) buffers agree across ranks.
            pairs = torch.stack([index.double(), error.double()], 1).cpu()
            gathered = [torch.empty_like(pairs) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, pairs)
            pairs = torch.cat(gathered).to(self.errors.device)
            index, error = pairs[:, 0].long(), pairs[:, 1].float()
        self.errors[index] = error
        mean = error.mean()
        if torch.isnan(self.running):
            self.running.copy_(mean)
            self.initial.copy_(mean)
        else:
            self.running.mul_(self.cfg.momentum).add_((1 - self.cfg.momentum) * mean)

    def forward(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Perturb a normalised batch x (B, C, H, W): returns (perturbed x, sigma (B,), rho (B,))."""
        sigma, rho = self.levels(index)
        if self.cfg.mode == "none":
            return x, sigma, rho
        return perturb(x, sigma, rho, self.cfg.patch), sigma, rho


def perturb(x: Tensor, sigma: Tensor, rho: Tensor, patch: int, generator: torch.Generator | None = None) -> Tensor:
    """Add Gaussian noise and mask patches, per sample.

    Args:
        x: (B, C, H, W) normalised chips (0 = band mean, 1 = one standard deviation).
        sigma: (B,) noise standard deviation per chip, in normalised units.
        rho: (B,) share of the ``patch`` x ``patch`` cells to set to 0 per chip (rounded to whole cells).
        patch: cell side in pixels; H and W need not be multiples of it (edge cells are partial).

    Returns:
        (B, C, H, W) perturbed copy: ``(x + sigma_i * n) * m`` with n ~ N(0, 1) and m the 0/1 cell mask, so masked
        cells carry no signal at all, noise included.
    """
    b, _, h, w = x.shape
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = x + sigma.view(b, 1, 1, 1).to(x.dtype) * noise
    n_cells = gh * gw
    k = torch.round(rho * n_cells).long()  # masked cells per chip
    if int(k.max()) == 0:
        return out
    scores = torch.rand(b, n_cells, generator=generator, device=x.device)
    rank = scores.argsort(1).argsort(1)  # a random permutation rank of each cell
    keep = (rank >= k.view(b, 1).to(x.device)).to(x.dtype).view(b, 1, gh, gw)
    keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
    return out * keep
