"""BatchNorm folded into the convolutions for inference (rs_engine/models/fuse.py): same outputs, no BatchNorm left
in the folded blocks, and the PyTorch predictor uses the folded network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rs_engine.models import ModelConfig, build_model
from rs_engine.models.fuse import fold_batchnorm
from rs_engine.runtime import load_predictor


def _with_random_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so that a wrong fold changes the output."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("backbone,expected", [("ssm_hybrid_tiny", 15), ("effnet_lite0", 48)])
def test_folded_body_gives_the_same_features(backbone: str, expected: int) -> None:
    torch.manual_seed(0)
    model = _with_random_statistics(build_model(ModelConfig(backbone=backbone, tile_size=128)))
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        before = model.backbone.body(x)
    assert fold_batchnorm(model) == expected
    body = model.backbone.body
    left = [n for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d) and not n.startswith("ssm")]
    assert not left
    with torch.inference_mode():
        after = body(x)
    for k in before:
        assert (after[k] - before[k]).abs().max() <= 1e-4 * before[k].abs().max(), k
    assert fold_batchnorm(model) == 0  # idempotent: nothing left to fold


def test_training_mode_is_refused() -> None:
    model = build_model(ModelConfig(backbone="ssm_hybrid_tiny", tile_size=64))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())


def test_torch_predictor_runs_the_folded_network() -> None:
    predictor, card = load_predictor("nwpu10", runtime="torch")
    assert card.architecture["backbone"].startswith("ssm_hybrid")
    assert not [m for m in predictor.model.backbone.body.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
