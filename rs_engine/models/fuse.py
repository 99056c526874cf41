"""Inference-time folding of BatchNorm into the convolution before it.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so it
folds into the preceding convolution's weights and bias (Ioffe & Szegedy 2015; the standard deployment step, as
``torch.nn.utils.fusion.fuse_conv_bn_eval`` and ONNX Runtime's Conv+BatchNormalization fusion do). The EfficientNet
MBConv stages of the ``effnet_*`` and ``ssm_hybrid_*`` bodies otherwise run ``aten::native_batch_norm`` after
each convolution (``bench/profile_tile.py``'s table listed it before this folding). Pairs are named per timm
block type, never guessed from module order.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: (convolution, BatchNorm) attribute pairs of the blocks whose forward applies one right after the other.
_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EffNetBackbone": (("conv_stem", "bn1"),),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
}


def _activation_of(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a BatchNorm once folded: timm's BatchNormAct2d keeps its activation (dropout is identity in
    eval mode), a plain BatchNorm2d nothing."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of the known block types into the convolution before it, in place.

    Args:
        model: a network in eval mode (inference only: the folded model has no BatchNorm statistics to train).

    Returns:
        The number of BatchNorms folded.

    Raises:
        ValueError: the model is in training mode.
    """
    if model.training:
        raise ValueError("fold_batchnorm: the model must be in eval mode")
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _PAIRS.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if not bn.track_running_stats or bn.running_mean is None or bn.num_features != conv.out_channels:
                continue
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, _activation_of(bn))
            folded += 1
    return folded
