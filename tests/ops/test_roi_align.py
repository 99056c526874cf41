"""FastMultiScaleRoIAlign (rs_engine/ops/roi_align.py) against torchvision's MultiScaleRoIAlign: the same outputs
and feature gradients in float64, over boxes inside, across and outside the image, tiny and large (all four FPN
levels); inference runs torchvision's op; every model's poolers are the fast ones."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from rs_engine.models import ModelConfig, build_model
from rs_engine.ops.roi_align import FastMultiScaleRoIAlign, roi_align_table

NAMES = ["0", "1", "2", "3"]
SHAPES = [(64, 48), (32, 24), (16, 12), (8, 6)]  # strides 4-32 of a 256 x 192 image


def _features(batch: int, channels: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) for n, (h, w) in
            zip(NAMES, SHAPES, strict=True)}


def _boxes(batch: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([300.0, 230.0]) - 20.0
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) ** 2 * 600.0 + 0.2  # sub-pixel to all levels
        out.append(torch.cat([xy, xy + wh], 1))
    return out


@pytest.mark.parametrize("output_size,sampling_ratio", [(7, 2), (14, 2), (5, 3)])
def test_matches_torchvision_forward_and_backward(output_size: int, sampling_ratio: int) -> None:
    ref = MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    fast = FastMultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    f_ref = {k: v.requires_grad_() for k, v in _features(2, 8, 0).items()}
    f_fast = {k: v.detach().clone().requires_grad_() for k, v in f_ref.items()}
    boxes = _boxes(2, 120, 1)
    a, b = ref(f_ref, boxes, [(256, 192)] * 2), fast(f_fast, boxes, [(256, 192)] * 2)
    assert b.shape == a.shape == (240, 8, output_size, output_size)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    for k in NAMES:
        assert f_ref[k].grad.abs().max() > 0, k  # every level is used
        assert torch.allclose(f_ref[k].grad, f_fast[k].grad, atol=1e-12, rtol=0), k


def test_no_boxes_and_inference_path() -> None:
    fast = FastMultiScaleRoIAlign(NAMES, 7, 2)
    feats = {k: v.float().requires_grad_() for k, v in _features(2, 4, 2).items()}
    out = fast(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], [(256, 192)] * 2)
    assert out.shape == (0, 4, 7, 7)
    boxes = [b.float() for b in _boxes(2, 10, 3)]
    with torch.no_grad():  # inference: torchvision's own op, the same numbers
        inf = fast(feats, boxes, [(256, 192)] * 2)
    train = fast(feats, boxes, [(256, 192)] * 2)
    assert train.requires_grad and torch.allclose(inf, train.detach(), atol=1e-5)


def test_table_refuses_adaptive_sampling() -> None:
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_table(torch.zeros(4, 2), torch.zeros(1, 4), z.long(), z.long() + 2, z.long() + 2, z, (7, 7), 0)


@pytest.mark.parametrize("backbone", ["ssm_hybrid_tiny", "resnet50"])
def test_models_train_through_the_fast_poolers(backbone: str) -> None:
    model = build_model(ModelConfig(backbone=backbone, tile_size=64))
    assert isinstance(model.roi_heads.box_roi_pool, FastMultiScaleRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, FastMultiScaleRoIAlign)


def test_export_path_merges_levels_as_torchvision_does(monkeypatch) -> None:
    """The exported graph's pooler (per-level RoIAlign, merged by one gather) gives torchvision's output exactly."""
    ref = MultiScaleRoIAlign(NAMES, 7, 2)
    fast = FastMultiScaleRoIAlign(NAMES, 7, 2)
    feats, boxes = _features(2, 8, 4), _boxes(2, 120, 5)
    a = ref(feats, boxes, [(256, 192)] * 2)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    b = fast(feats, boxes, [(256, 192)] * 2)
    assert len({int(v) for v in fast.map_levels(boxes)}) == 4  # RoIs on every level, interleaved
    assert torch.equal(a, b)
