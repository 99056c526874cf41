"""``build_model(config)``: backbone + FPN + torchvision's Mask R-CNN (RPN, RoI box head, FCN mask head).

Composition as in torchvision detection (He et al. 2017, "Mask R-CNN"; Lin et al. 2017, FPN): the backbone is
the only part of our own; the neck and heads are torchvision's, sized for CPU inference on tiles.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rs_engine.models.config import (
    BACKBONES,
    EffNetBackboneConfig,
    HeatBackboneConfig,
    HybridBackboneConfig,
    ModelConfig,
)
from rs_engine.models.effnet import EffNetBackbone
from rs_engine.models.heat import HeatBackbone
from rs_engine.models.paste import use_continuous_paste
from rs_engine.models.ssm import SSMBackbone
from rs_engine.ops.roi_align import FastMultiScaleRoIAlign


class BackboneWithFPN(nn.Module):
    """(B, C_in, H, W) -> OrderedDict of 5 FPN maps (strides 4, 8, 16, 32, 64), each ``out_channels`` wide."""

    def __init__(self, body: SSMBackbone | HeatBackbone | EffNetBackbone, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def build_model(config: ModelConfig) -> MaskRCNN:
    """Build an untrained instance-segmentation network from its config.

    Input: a list of (C, H, W) float tensors already normalised per band (the model does no normalisation
    or resizing of its own: ``image_mean`` 0, ``image_std`` 1, sizes fixed at ``config.tile_size``).
    Output in eval mode: torchvision's list of dicts with ``boxes`` (K, 4) x1y1x2y2 pixels, ``labels`` (K,)
    in 1..num_classes, ``scores`` (K,), ``masks`` (K, 1, H, W) probabilities, pasted at continuous box
    coordinates (:mod:`rs_engine.models.paste`).

    A heat backbone's stem follows its config (``"auto"``: the SAR stem for one band); ``config.extra["stem"]``
    ("optical" or "sar") overrides it. ``config.extra["prompt_head"]`` (a :class:`PromptHeadConfig` dict) adds
    ``model.prompt_head`` (:mod:`rs_engine.models.prompt_head`). ``config.head == "prompt"`` (RSPrompter-anchor,
    arXiv 2306.16269) builds no FCN mask head (``roi_heads`` then gives no masks and trains no mask loss) and always
    adds a prompt head (the default :class:`PromptHeadConfig` at the FPN's width when ``extra`` names none); its
    masks come from :class:`rs_engine.models.prompter.PromptHeadInstances`, which ``load_model`` wraps it in.

    Raises:
        ValueError: unknown backbone name (from :class:`ModelConfig`) or stem kind.
    """
    c = config
    if c.backbone == "resnet50":
        model = _resnet50_maskrcnn(c)
        if c.neck == "separable_fpn":
            separable_neck(model)
        return _with_prompt_head(model, c)
    backbone = BackboneWithFPN(build_backbone(c), c.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in c.anchor_sizes), ((0.5, 1.0, 2.0),) * len(c.anchor_sizes))
    box_head = TwoMLPHead(c.fpn_channels * 7 * 7, c.representation_size)
    mask_head = MaskRCNNHeads(c.fpn_channels, [c.mask_head_channels] * c.mask_head_convs, 1)
    box_predictor = FastRCNNPredictor(c.representation_size, c.num_classes + 1)
    mask_predictor = MaskRCNNPredictor(c.mask_head_channels, c.mask_head_channels, c.num_classes + 1)
    model = MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors below (class 0 is background)
        min_size=c.tile_size,
        max_size=c.tile_size,
        image_mean=[0.0] * c.in_channels,
        image_std=[1.0] * c.in_channels,
        rpn_anchor_generator=anchors,
        rpn_post_nms_top_n_test=c.rpn_post_nms_top_n_test,
        # torchvision's poolers (levels "0"-"3", 7 and 14 bins, 2 samples per bin), trained through one
        # embedding_bag instead of torchvision's scalar CPU backward (rs_engine/ops/roi_align.py)
        box_roi_pool=FastMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        box_head=box_head,
        box_predictor=box_predictor,
        box_detections_per_img=c.box_detections_per_img,
        box_score_thresh=c.box_score_thresh,
        mask_roi_pool=FastMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )
    if c.neck == "separable_fpn":
        separable_neck(model)
    return _with_prompt_head(use_continuous_paste(model), c)


def separable_conv(channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    """A depthwise ``kernel`` x ``kernel`` convolution (no bias) then a 1x1 pointwise one (with bias): (B, C, H, W)
    -> (B, O, H, W), same padding. Costs ``C * (k^2 + O)`` multiply-adds per pixel against ``C * k^2 * O`` dense."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
        nn.Conv2d(channels, out_channels, 1),
    )


def separable_neck(model: MaskRCNN) -> None:
    """Make the FPN's 3x3 output convolutions and the RPN head's shared 3x3 convolution depthwise-separable, in
    place (:attr:`ModelConfig.neck` ``"separable_fpn"``). Parameter names: ``<dense conv's Sequential>.0.weight``
    is the depthwise kernel, ``.1.weight`` and ``.1.bias`` the pointwise convolution, so a dense model's weights
    map onto them by name (``training.train.init_from`` factorises them)."""
    fpn = model.backbone.fpn
    for i, block in enumerate(fpn.layer_blocks):
        conv = block[0]
        fpn.layer_blocks[i] = separable_conv(conv.in_channels, conv.out_channels)
    head = model.rpn.head
    conv = head.conv[0][0]
    head.conv = nn.Sequential(nn.Sequential(*separable_conv(conv.in_channels, conv.out_channels), nn.ReLU()))
    for layer in (*fpn.layer_blocks.modules(), *head.conv.modules()):  # as torchvision initialises its FPN
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_uniform_(layer.weight, a=1)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0)


def _with_prompt_head(model: MaskRCNN, c: ModelConfig) -> MaskRCNN:
    if c.head == "prompt":
        # The masks come from the prompt head: an FCN mask head would sit untrained in the model file. torchvision
        # builds one whatever its arguments, so it is removed after (the other weights draw the same random numbers
        # as a Mask R-CNN's of the same seed).
        heads = model.roi_heads
        heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None
    if "prompt_head" in c.extra or c.head == "prompt":  # the SAM-style head of issue 16
        from rs_engine.models.prompt_head import PromptHeadConfig, attach_prompt_head

        config = c.extra.get("prompt_head") or PromptHeadConfig(fpn_channels=model.backbone.out_channels)
        attach_prompt_head(model, config)
    return model


def build_backbone(config: ModelConfig) -> SSMBackbone | HeatBackbone | EffNetBackbone:
    """The backbone body alone (no FPN): (B, C_in, H, W) -> OrderedDict "0".."3" at strides 4..32.

    Raises:
        ValueError: a baseline name (its body is torchvision's, see :func:`build_model`) or an unknown stem kind.
    """
    cfg = BACKBONES.get(config.backbone)
    if cfg is None:
        raise ValueError(f"{config.backbone!r} has no body of its own to build")
    if isinstance(cfg, HeatBackboneConfig):
        return HeatBackbone(cfg, config.in_channels, stem=config.extra.get("stem"))
    if isinstance(cfg, EffNetBackboneConfig | HybridBackboneConfig):
        return EffNetBackbone(cfg, config.in_channels)
    return SSMBackbone(cfg, config.in_channels)


def _resnet50_maskrcnn(c: ModelConfig) -> MaskRCNN:
    """torchvision's ResNet-50-FPN Mask R-CNN (the usual choice; baseline), untrained, N-band input."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=c.num_classes + 1,
        min_size=c.tile_size,
        max_size=c.tile_size,
        image_mean=[0.0] * c.in_channels,
        image_std=[1.0] * c.in_channels,
        box_detections_per_img=c.box_detections_per_img,
        box_score_thresh=c.box_score_thresh,
        box_roi_pool=FastMultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),  # as build_model: a fair baseline
        mask_roi_pool=FastMultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
    )
    if c.in_channels != 3:
        old = model.backbone.body.conv1
        model.backbone.body.conv1 = nn.Conv2d(c.in_channels, old.out_channels, 7, 2, 3, bias=False)
    return use_continuous_paste(model)


def count_flops(model: MaskRCNN | nn.Module, size: int, in_channels: int = 3) -> dict[str, float]:
    """GFLOPs of the backbone body (no FPN, no heads) on one (in_channels, size, size) tile.

    Uses ``torch.utils.flop_counter`` for matrix products and convolutions (including the DCT matrix products of
    heat backbones; their elementwise decay products, one multiply per cell and channel, are left out), plus the
    analytic cost of the selective scans (9 * L * D * N, as mamba-ssm counts them), which run as elementwise ops
    the counter does not see. A multiply-add counts as 2 FLOPs. A heat backbone in eval mode is counted with its
    decay maps precomputed (its inference cost: the k t projections of the frequency embeddings are not repeated
    per tile); in training mode they are counted.

    Returns:
        ``{"backbone_gflops": ..., "scan_gflops": ..., "params_m": ...}`` (params in millions).
    """
    from torch.utils.flop_counter import FlopCounterMode

    # A detector (Mask R-CNN, or one wrapped with its prompt head as instance head) or a body itself.
    net = model.backbone.body if hasattr(getattr(model, "backbone", None), "body") else model
    x = torch.zeros(1, in_channels, size, size)
    for m in net.modules():
        if isinstance(m, HeatBackbone) and not m.training:
            m.precompute(size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    scan = 0
    for m in net.modules():
        if isinstance(m, SSMBackbone | EffNetBackbone):
            scan += m.scan_flops(1, size, size)
    return {
        "backbone_gflops": (counter.get_total_flops() + scan) / 1e9,
        "scan_gflops": scan / 1e9,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
    }
