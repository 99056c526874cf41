"""Start a ``separable_fpn`` model from a dense-neck one: fit each depthwise-separable convolution to the dense
convolution it replaces, on real features (layer-wise distillation), before fine-tuning the whole network.

The SVD factorisation of :func:`training.train.factorise_separable` alone is a poor start: a trained 3x3 FPN or
RPN kernel is far from rank 1 per input channel (about 90% relative error on ``nwpu10``'s), so the heads would see
features unlike those they were trained on. Fitting on the features the dense model actually produces (inputs of
low rank, as real feature maps are) recovers most of its outputs; the fine-tuning that follows does the rest. The
same idea as FitNets' hint layers (Romero et al. 2015) and the layer-wise reconstruction of channel pruning (He et
al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _pairs(dense: nn.Module, separable: nn.Module) -> list[tuple[str, nn.Conv2d, nn.Sequential]]:
    """(name, dense 3x3 conv, its (depthwise, pointwise) replacement) for the FPN outputs and the RPN conv."""
    out = []
    for i, (d, s) in enumerate(zip(dense.backbone.fpn.layer_blocks, separable.backbone.fpn.layer_blocks,
                                   strict=True)):
        out.append((f"fpn.layer_blocks.{i}", d[0], s))
    d, s = dense.rpn.head.conv[0][0], separable.rpn.head.conv[0]
    out.append(("rpn.head.conv", d, nn.Sequential(s[0], s[1])))
    return out


def fit_separable_neck(model: nn.Module, source: str | Path, chips: Any, max_chips: int = 16, steps: int = 300,
                       lr: float = 3e-3) -> dict[str, Any]:
    """Fit ``model``'s separable FPN and RPN convolutions to the dense ones of ``source`` (a model name or file
    with the same backbone, FPN laterals and heads), in place.

    For each dense 3x3 convolution its inputs and outputs (before the RPN's ReLU) are recorded on the first
    ``max_chips`` chips of ``chips`` (a dataset of ``(image, target)``, images (C, H, W) normalised as the model
    expects), the source model in eval mode; then its depthwise-separable replacement (already factorised by
    ``init_from``) is trained with Adam on the mean squared error for ``steps`` steps, one chip per step.

    Returns:
        ``{"chips", "steps", "seconds", "relative_error": {layer: [before, after]}}`` (error: ``||y_sep - y|| /
        ||y||`` over the recorded chips), for the card's provenance.

    Raises:
        InputError: the source model is missing or unreadable (from :mod:`rs_engine.checkpoint`).
    """
    from rs_engine.checkpoint import load_model

    start = time.perf_counter()
    dense, _ = load_model(str(source))
    dense.eval()
    pairs = _pairs(dense, model)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _, _ in pairs}
    hooks = [conv.register_forward_hook(lambda m, i, o, name=name: records[name].append((i[0], o)))
             for name, conv, _ in pairs]
    n = min(max_chips, len(chips))
    with torch.no_grad():
        for k in range(n):
            dense([chips[k][0].float()])
    for h in hooks:
        h.remove()
    report = {}
    for name, _, sep in pairs:
        data = records[name]
        before = _relative_error(sep, data)
        opt = torch.optim.Adam(sep.parameters(), lr=lr)
        sep.train()
        for step in range(steps):
            x, y = data[step % len(data)]
            loss = nn.functional.mse_loss(sep(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        report[name] = [round(before, 4), round(_relative_error(sep, data), 4)]
        log.info("separable %s: relative error %.3f -> %.3f", name, *report[name])
    return {"chips": n, "steps": steps, "seconds": round(time.perf_counter() - start, 1), "relative_error": report}


def _relative_error(sep: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        err = sum(float((sep(x) - y).pow(2).sum()) for x, y in data)
        ref = sum(float(y.pow(2).sum()) for _, y in data)
    return (err / max(ref, 1e-12)) ** 0.5
