"""Mask pasting at continuous box coordinates (rs_engine.models.paste): the inverse of how training projects the
truth onto a box, and continuous in the box, which torchvision's whole-pixel paste is not."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

from rs_engine.models import ModelConfig, build_model
from rs_engine.models.paste import ContinuousPasteTransform, paste_masks

H = W = 128


def _ellipses(n: int, seed: int = 0):
    """Random filled ellipses (H, W) and their boxes as training makes them (x0, y0, x1 + 1, y1 + 1)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for _ in range(n):
        cx, cy = torch.rand(2, generator=g) * 60 + 34
        a, b = torch.rand(2, generator=g) * 20 + 6
        gt = (((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1).float()
        ys, xs = torch.nonzero(gt, as_tuple=True)
        yield gt, torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


def test_paste_inverts_the_training_projection():
    """A truth mask projected onto its box as torchvision's Mask R-CNN loss does (roi_align, aligned=False, 28 x 28),
    then pasted back, is the truth again (mean IoU >= 0.97; torchvision's paste_masks_in_image: 0.94)."""
    ious = []
    for gt, box in _ellipses(40):
        cells = roi_align(gt[None, None], [box], (28, 28), 1.0)
        back = paste_masks(cells, box, (H, W))[0, 0] > 0.5
        truth = gt > 0.5
        ious.append(float((back & truth).sum() / (back | truth).sum()))
    assert np.mean(ious) >= 0.97 and min(ious) >= 0.9, (np.mean(ious), min(ious))


def test_paste_is_continuous_in_the_box():
    """Moving boxes by 0.02 px, at 50 offsets over a whole pixel, moves mask values by little (torchvision's paste
    moves the mask by a whole pixel where the box crosses a pixel boundary: values jump by up to the contrast)."""
    masks = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[30.0, 20.2, 90.0, 100.5], [0.0, 0.0, 40.0, 17.0], [100.3, 90.0, 140.0, 135.0]])
    step = torch.tensor([0.02, 0.0, 0.02, 0.0])
    change = max(float((paste_masks(masks, boxes + k * step, (H, W))
                        - paste_masks(masks, boxes + (k + 1) * step, (H, W))).abs().max()) for k in range(50))
    assert change < 0.05, change
    a = paste_masks(masks, boxes, (H, W))
    assert a.shape == (3, 1, H, W)
    far = torch.ones(H, W, dtype=torch.bool)
    far[18:104, 28:94] = False  # more than a cell away from the first box ...
    assert a[0, 0][far].abs().max() == 0  # ... the mask is exactly 0
    assert paste_masks(masks[:0], boxes[:0], (H, W)).shape == (0, 1, H, W)


def test_models_paste_continuously():
    """Every built model (and so every loaded one, the export and the evaluation) uses the continuous paste."""
    for backbone in ("ssm_tiny", "resnet50"):
        model = build_model(ModelConfig(backbone=backbone, num_classes=2, in_channels=1, tile_size=128))
        assert type(model.transform) is ContinuousPasteTransform
        model.eval()
        with torch.no_grad():
            out = model([torch.rand(1, 128, 128)])[0]
        assert out["masks"].shape[1:] == (1, 128, 128)
