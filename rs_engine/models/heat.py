"""Heat-conduction backbones: the Heat Conduction Operator (HCO), blocks, stems and a 4-stage hierarchy.

Sources:
- Wang et al. 2024, "vHeat: Building Vision Models upon Heat Conduction" (CVPR 2025): the HCO, the block
  (DWConv -> Linear -> split (x, z) -> HCO(x) -> LayerNorm -> x * SiLU(z) -> Linear), k t predicted from
  learnable frequency value embeddings (FVEs) by Linear + ReLU, the stride-4 two-conv stem, and precomputing the
  decay maps for inference.
- Hu et al. 2025, "RS-vHeat: Heat Conduction Guided Efficient Remote Sensing Foundation Model" (seed 001,
  ../shared/REFERENCES.md): a learnable heat capacity per stage and separate stems for optical and SAR input.

The physics. Heat conduction in a rectangle ``[0, a] x [0, b]`` with insulated (Neumann) edges,
``du/dt = k (d2u/dx2 + d2u/dy2)``, starting from ``u(x, y, 0)``, has the solution::

    u(x, y, t) = sum_{n, m >= 0} U~(n, m) exp(-k t ((n pi / a)^2 + (m pi / b)^2)) cos(n pi x / a) cos(m pi y / b)

where ``U~`` are the cosine-series coefficients of ``u(., ., 0)``. On an (H, W) grid of feature-map cells
(``a = H``, ``b = W``, cell centres at ``x = i + 0.5``) the coefficients are the 2-D DCT-II of the grid, so::

    HCO(u) = IDCT2( DCT2(u) * exp(-k t ((n pi / H)^2 + (m pi / W)^2)) )

with the DCTs as matrix products along H then W (:mod:`rs_engine.ops.dct`): ``O(N^1.5)`` for ``N = H W``
cells, a global receptive field. vHeat makes ``k t >= 0`` a learned function of frequency and channel:
``k t = ReLU(Linear(FVE))``, FVE a learnable (G, G, C) embedding per stage, shared by the stage's blocks, each
block with its own Linear. For any tile size the FVE is bilinearly resized to the (H, W) frequency grid.
In eval mode without gradients the decay maps ``exp(-k t ...)`` are cached per grid size (the parameters are
fixed), so inference costs two DCT pairs and one product per operator; :meth:`HeatBackbone.precompute` fills the
caches ahead of time.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rs_engine.models.config import HeatBackboneConfig
from rs_engine.models.ssm import LayerNorm2d, Mlp
from rs_engine.ops import dct2, idct2


def frequency_squared(h: int, w: int, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """(H, W) squared angular frequencies ``(n pi / H)^2 + (m pi / W)^2`` of the DCT-II modes (per cell^2)."""
    n = torch.arange(h, device=device, dtype=torch.float64) * (math.pi / h)
    m = torch.arange(w, device=device, dtype=torch.float64) * (math.pi / w)
    return (n[:, None] ** 2 + m[None, :] ** 2).to(dtype)


def heat_conduction(u: Tensor, decay: Tensor) -> Tensor:
    """The Heat Conduction Operator on a channels-last grid: ``IDCT2(DCT2(u) * decay)``.

    Args:
        u: (B, H, W, C) temperature field at ``t = 0`` (feature map, channels last).
        decay: (H, W, C) or (H, W, 1) ``exp(-k t ((n pi / H)^2 + (m pi / W)^2))``, see :func:`heat_decay`.

    Returns:
        (B, H, W, C) the field at time ``t`` (Neumann boundary: heat never leaves the grid, so the mean of each
        channel is kept).
    """
    return idct2(dct2(u, dims=(1, 2)) * decay, dims=(1, 2))


def heat_decay(kt: Tensor) -> Tensor:
    """``exp(-k t ((n pi / H)^2 + (m pi / W)^2))`` from ``kt`` (H, W, C), ``k t >= 0`` per frequency and channel."""
    h, w = kt.shape[:2]
    return torch.exp(-kt * frequency_squared(h, w, kt.device, kt.dtype)[..., None])


def resize_fve(fve: Tensor, h: int, w: int) -> Tensor:
    """A (G, G', C) frequency value embedding resized (bilinear) to the (H, W) frequency grid."""
    if fve.shape[:2] == (h, w):
        return fve
    x = F.interpolate(fve.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0)


class HeatConduction(nn.Module):
    """vHeat's HCO mixer: (B, H, W, C) -> (B, H, W, C).

    DWConv3x3 -> Linear(C, 2C) -> split (x, z) -> HCO(x) with ``k t = ReLU(Linear(FVE))`` -> LayerNorm ->
    x * SiLU(z) -> Linear(C, C).

    In eval mode with gradients off the decay map is cached per (H, W, device, dtype) and recomputed only if
    the FVE or the k t projection have changed since (their version counters), so loading new weights into an
    eval-mode model never serves stale maps.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.linear = nn.Linear(dim, 2 * dim)
        self.to_k = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.out_norm = nn.LayerNorm(dim)
        self.out_linear = nn.Linear(dim, dim)
        self._cache: dict[tuple, tuple[tuple[int, ...], Tensor]] = {}

    def kt(self, fve: Tensor, h: int, w: int) -> Tensor:
        """(H, W, C) ``k t >= 0`` per frequency and channel from the stage's FVE (G, G, C)."""
        return self.to_k(resize_fve(fve, h, w))

    def decay(self, fve: Tensor, h: int, w: int, dtype: torch.dtype | None = None) -> Tensor:
        """(H, W, C) decay map; served from the cache in eval mode without gradients."""
        dtype = dtype or fve.dtype
        if self.training or torch.is_grad_enabled():
            return heat_decay(self.kt(fve, h, w)).to(dtype)
        key = (h, w, fve.device, dtype)
        versions = (fve._version, *(p._version for p in self.to_k.parameters()))
        hit = self._cache.get(key)
        if hit is None or hit[0] != versions:
            # Built outside inference mode: the cached tensor stays usable by any later no-grad call.
            with torch.inference_mode(False), torch.no_grad():
                hit = (versions, heat_decay(self.kt(fve, h, w)).to(dtype))
            self._cache[key] = hit
        return hit[1]

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, x: Tensor, fve: Tensor) -> Tensor:
        _, h, w, _ = x.shape
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x, z = self.linear(x).chunk(2, dim=-1)
        x = heat_conduction(x, self.decay(fve, h, w, x.dtype))
        x = self.out_norm(x) * F.silu(z)
        return self.out_linear(x)


class HeatBlock(nn.Module):
    """Pre-norm residual block on (B, H, W, C): x + HCO(LN(x)), then x + MLP(LN(x)) (vHeat)."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = HeatConduction(dim)
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, fve: Tensor) -> Tensor:
        x = x + self.mixer(self.norm(x), fve)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class HeatCapacity(nn.Module):
    """RS-vHeat's learnable heat capacity at a stage input, on (B, C, H, W): ``x + DWConv(LN(ReLU(x + c)))``.

    ``c`` (C,) is a learned per-channel offset: where ``x + c <= 0`` a cell stores no heat and contributes
    nothing to the branch, so the stage learns per channel which responses feed the conduction that follows.
    Residual (our choice) so that a fresh ``c = 0`` does not remove the negative half of the features.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.capacity = nn.Parameter(torch.zeros(dim))
        self.norm = LayerNorm2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dwconv(self.norm(F.relu(x + self.capacity[:, None, None])))


def make_stem(kind: str, in_channels: int, dim: int) -> nn.Sequential:
    """(B, C_in, H, W) -> (B, dim, ceil(H/4), ceil(W/4)): two stride-2 convolutions (vHeat's stem).

    ``kind="sar"`` (RS-vHeat's separate SAR stem): the first convolution is 7x7 instead of 3x3, so each
    stride-4 cell sees more independent speckle samples (single-look SAR speckle is multiplicative and
    uncorrelated between pixels; averaging more of them is the classical multi-look remedy).
    """
    k = 7 if kind == "sar" else 3
    return nn.Sequential(
        nn.Conv2d(in_channels, dim // 2, k, stride=2, padding=k // 2), LayerNorm2d(dim // 2), nn.GELU(),
        nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), LayerNorm2d(dim),
    )


class HeatBackbone(nn.Module):
    """Multi-scale features from a heat-conduction backbone: (B, C_in, H, W) -> OrderedDict of 4 maps.

    Output keys "0".."3" are feature maps at strides 4, 8, 16, 32 (sides ``ceil(H / s)``) with channels
    ``self.out_channels_list``, ready for torchvision's FeaturePyramidNetwork -- the contract of
    :class:`rs_engine.models.ssm.SSMBackbone`, with the same parameter names for the stem (``patch_embed``),
    ``stages`` and ``downsamples`` so that freezing and initialisation treat both alike.

    Args:
        cfg: the variant (:data:`rs_engine.models.config.BACKBONES` ``heat_*``).
        in_channels: input bands; with ``cfg.stem == "auto"`` one band selects the SAR stem.
        stem: overrides ``cfg.stem`` when given ("optical" or "sar").

    Raises:
        ValueError: an unknown stem kind.
    """

    def __init__(self, cfg: HeatBackboneConfig, in_channels: int, stem: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        kind = stem or cfg.stem
        if kind == "auto":
            kind = "sar" if in_channels == 1 else "optical"
        if kind not in ("optical", "sar"):
            raise ValueError(f"stem must be auto, optical or sar, got {kind!r}")
        self.stem_kind = kind
        dims = cfg.dims
        self.patch_embed = make_stem(kind, in_channels, dims[0])
        self.fves = nn.ParameterList(nn.Parameter(torch.empty(g, g, d)) for g, d in zip(cfg.fve_grid, dims))
        for p in self.fves:
            nn.init.trunc_normal_(p, std=0.02)
        self.capacities = nn.ModuleList(HeatCapacity(d) if cfg.heat_capacity else nn.Identity() for d in dims)
        self.stages = nn.ModuleList(
            nn.ModuleList(HeatBlock(d, cfg.mlp_ratio) for _ in range(n)) for d, n in zip(dims, cfg.depths)
        )
        self.downsamples = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1]))
            for i in range(3)
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.out_channels_list = list(dims)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.patch_embed(x)  # (B, C0, H/4, W/4)
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = self.capacities[i](x)
            t = x.permute(0, 2, 3, 1)  # blocks work channels-last
            for block in blocks:
                t = block(t, self.fves[i])
            feats[str(i)] = self.out_norms[i](t).permute(0, 3, 1, 2).contiguous()
            x = t.permute(0, 3, 1, 2)
        return feats

    @staticmethod
    def grid_sizes(h: int, w: int) -> list[tuple[int, int]]:
        """(H_i, W_i) of the 4 stages for an (H, W) input: each stride-2 conv (padding 1) gives ceil(side/2)."""
        sizes = []
        for i in range(5):
            h, w = -(-h // 2), -(-w // 2)
            if i >= 1:
                sizes.append((h, w))
        return sizes

    @torch.no_grad()
    def precompute(self, size: int | tuple[int, int], dtype: torch.dtype = torch.float32) -> None:
        """Fill the decay-map caches for (size x size) or (H, W) input tiles and switch to eval mode.

        The caches are used by every later eval-mode, no-gradient forward at that size; other sizes are cached
        on first use. Training mode (``train()``) never uses them. Call it after moving the model to its device.
        """
        self.eval()
        h, w = (size, size) if isinstance(size, int) else size
        for (gh, gw), fve, blocks in zip(self.grid_sizes(h, w), self.fves, self.stages):
            for block in blocks:
                block.mixer.decay(fve, gh, gw, dtype)

    def clear_cache(self) -> None:
        """Drop the cached decay maps (they are rebuilt on demand)."""
        for m in self.modules():
            if isinstance(m, HeatConduction):
                m.clear_cache()
