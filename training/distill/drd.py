"""Dual relation distillation (DRD; Li et al., "Building lightweight semantic segmentation models for aerial images
using dual relation distillation", seed 002): align the student's spatial relations (which positions look alike) and
channel relations (which channels fire together) with the teacher's. Training only: no inference cost.

Relation maps:
- spatial: A = F^T F / (|f_p| |f_q|), the (N, N) cosine affinity between the feature vectors of N positions;
- channel: G = F F^T / (|f_c| |f_d|), the (C, C) cosine affinity (normalised Gram matrix) between channels, each
  channel's map seen as an N-vector.

Memory: a (B, C, H, W) map at stride 4 of a 512 px chip has 16 384 positions, and its spatial map would hold
2.7e8 entries per chip. Before the spatial relation the map is therefore average-pooled (adaptive pooling) to a grid
of at most ``max_positions`` cells, keeping its aspect ratio; the default 1024 (32 x 32) keeps a (B, 1024, 1024)
float map at 4 MB per chip. Pooling, not random sampling, so the teacher and student maps compare the same regions
and the loss is deterministic (a cached teacher stays valid).

Distances (why these):
- spatial: row-wise KL divergence between softmax(A_t / tau) and softmax(A_s / tau). Each row becomes a distribution
  over "which positions resemble this one"; most of the N^2 pairs are unrelated background, and a plain mean square
  error over them is dominated by that mass and gives each pair a tiny gradient. The temperature softmax puts the
  weight on the strongest affinities, i.e. parts of the same object, the structure segmentation needs (the same
  argument as for pairwise and structured distillation of dense predictors). Needs no learned alignment: each net's
  cosines use its own channels, so any widths compare.
- channel: mean square error between the cosine maps G_s and G_t. C x C is small and dense, every entry is a
  meaningful co-activation in [-1, 1], and no row is a distribution. The student's channels are first mapped to the
  teacher's count by a learned 1 x 1 convolution (a channel relation needs the same channels on both sides).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def pool_positions(x: Tensor, max_positions: int) -> Tensor:
    """Average-pool (B, C, H, W) to (B, C, h, w) with h * w <= ``max_positions``, aspect ratio kept; unchanged if
    H * W already fits."""
    h, w = x.shape[-2:]
    if h * w <= max_positions:
        return x
    scale = math.sqrt(max_positions / (h * w))
    gh, gw = max(1, int(h * scale)), max(1, int(w * scale))
    while gh * gw > max_positions:  # rounding guard
        gh, gw = max(1, gh - 1), gw
    return F.adaptive_avg_pool2d(x, (gh, gw))


def spatial_relation(x: Tensor, max_positions: int = 1024) -> Tensor:
    """Cosine affinity between positions: (B, C, H, W) -> (B, N, N), N = positions after :func:`pool_positions`."""
    f = F.normalize(pool_positions(x, max_positions).flatten(2), dim=1, eps=1e-8)  # (B, C, N), unit columns
    return f.transpose(1, 2) @ f


def channel_relation(x: Tensor) -> Tensor:
    """Cosine affinity between channels (normalised Gram matrix): (B, C, H, W) -> (B, C, C)."""
    f = F.normalize(x.flatten(2), dim=2, eps=1e-8)  # (B, C, HW), unit rows
    return f @ f.transpose(1, 2)


def spatial_distance(a_student: Tensor, a_teacher: Tensor, tau: float = 0.1) -> Tensor:
    """Row-wise KL(softmax(A_t / tau) || softmax(A_s / tau)), averaged over rows: (B, N, N) x2 -> (B,) in nats."""
    log_s = F.log_softmax(a_student / tau, dim=-1)
    log_t = F.log_softmax(a_teacher / tau, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean(-1)


def channel_distance(g_student: Tensor, g_teacher: Tensor) -> Tensor:
    """Mean square difference of channel cosine maps: (B, C, C) x2 -> (B,)."""
    return (g_student - g_teacher).pow(2).flatten(1).mean(1)


class DRDLoss(nn.Module):
    """Dual relation loss between matched student and teacher feature maps (levels paired by the caller).

    ``forward(student, teacher)`` takes two lists of maps, student ``(B, C_s, H_s, W_s)`` and teacher
    ``(B, C_t, H_t, W_t)`` per pair; the student map is resized to the teacher's H, W (bilinear) for both
    relations, and projected to C_t channels (learned 1 x 1 conv) for the channel relation. Returns
    ``(loss (scalar), {"drd_spatial": float, "drd_channel": float})``: loss = mean over pairs of
    (spatial_weight * KL + channel_weight * MSE), averaged over the batch.

    Args:
        pairs: ``[(C_s, C_t), ...]`` channel counts of each pair.
        max_positions: spatial-relation size cap (see the module docstring).
        tau: softmax temperature of the spatial distance (cosines in [-1, 1]; 0.1 makes e^(2/0.1) the widest
            ratio between row weights).
    """

    def __init__(self, pairs: list[tuple[int, int]], max_positions: int = 1024, tau: float = 0.1,
                 spatial_weight: float = 1.0, channel_weight: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in pairs)
        self.max_positions, self.tau = max_positions, tau
        self.spatial_weight, self.channel_weight = spatial_weight, channel_weight

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        if len(student) != len(teacher) or len(student) != len(self.proj):
            raise ValueError(f"DRD: {len(self.proj)} level pairs, got {len(student)} student / {len(teacher)} teacher")
        sp_total, ch_total = 0.0, 0.0
        for s, t, proj in zip(student, teacher, self.proj):
            t = t.detach().float()
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            sp = spatial_distance(spatial_relation(s, self.max_positions), spatial_relation(t, self.max_positions),
                                  self.tau).mean()
            ch = channel_distance(channel_relation(proj(s)), channel_relation(t)).mean()
            sp_total, ch_total = sp_total + sp, ch_total + ch
        n = len(self.proj)
        loss = (self.spatial_weight * sp_total + self.channel_weight * ch_total) / n
        return loss, {"drd_spatial": float(sp_total.detach()) / n, "drd_channel": float(ch_total.detach()) / n}
