"""Mask pasting with continuous box coordinates: (K, 1, M, M) RoI masks -> (K, 1, H, W) image masks.

torchvision's ``paste_masks_in_image`` rounds each (padded) box to whole pixels, resizes the mask to that integer
size and copies it in. A box that moves by 0.01 px across a rounding boundary then shifts or stretches its mask by
a whole pixel: mask probabilities jump by up to 0.5 along the outline, and the same model run by two runtimes (or
two CPUs, whose float sums differ in the last bits) gives outlines that differ by a pixel all round (mask IoU 0.93
on a 2600 px airplane, seen between PyTorch and ONNX Runtime). Pasting by bilinear interpolation at each pixel's
exact position in the box frame is continuous in the box, as detectron2's ``paste_masks_in_image`` (grid_sample)
is; here it is written as two small matrix products per mask, which trace to ONNX as MatMul.

The box frame is the one the mask head was trained in: torchvision's ``project_masks_on_boxes`` samples the truth
with ``roi_align(aligned=False)``, so mask cell ``k`` is centred at pixel coordinate ``x0 + (k + 0.5) * w / M``
(pixel ``j`` at coordinate ``j``), and outside the M x M cells the mask falls to 0 over one cell, as torchvision's
one-cell zero padding makes it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes


def _tent_weights(lo: Tensor, hi: Tensor, size: int, cells: int) -> Tensor:
    """(K, size, cells) bilinear weights of each pixel 0..size-1 on the cells of the interval [lo, hi] (K,)."""
    pixels = torch.arange(size, dtype=lo.dtype, device=lo.device)
    extent = (hi - lo).clamp(min=1e-3)  # a degenerate box still gets finite weights
    u = (pixels[None, :] - lo[:, None]) / extent[:, None] * cells - 0.5  # (K, size) in cell units
    k = torch.arange(cells, dtype=lo.dtype, device=lo.device)
    return (1 - (u[:, :, None] - k[None, None, :]).abs()).clamp(min=0)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paste RoI masks into the image by bilinear interpolation at continuous box coordinates.

    Args:
        masks: (K, 1, M, M) mask probabilities in each box's frame (the mask head's output).
        boxes: (K, 4) x1 y1 x2 y2 in image pixels.
        image_size: (H, W) of the image.

    Returns:
        (K, 1, H, W) probabilities, 0 away from each box.
    """
    h, w = int(image_size[0]), int(image_size[1])
    m = masks.shape[-1]
    # No branch on the detection count: the ONNX tracer would freeze it (K = 0 works through bmm as it is).
    boxes = boxes.to(masks.dtype)
    wy = _tent_weights(boxes[:, 1], boxes[:, 3], h, m)  # (K, H, M)
    wx = _tent_weights(boxes[:, 0], boxes[:, 2], w, m)  # (K, W, M)
    return torch.bmm(torch.bmm(wy, masks[:, 0]), wx.transpose(1, 2))[:, None]


class ContinuousPasteTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform, pasting masks with :func:`paste_masks` (same resizing and batching).

    With ``paste = False`` the masks stay in their boxes' frames, returned as ``roi_masks`` (K, 1, M, M): the
    engine pastes them box by box (:func:`rs_engine.maskpaste.paste_window`), never holding a full-image plane
    per detection. The engine's predictors and exported graphs use that; training and evaluation keep ``masks``.
    """

    paste = True

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes, strict=True):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred and self.paste:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], o_im_s)
            elif "masks" in pred:  # the box-frame masks, as the mask head made them
                pred["roi_masks"] = pred.pop("masks")
        return result


def use_continuous_paste(model: torch.nn.Module) -> torch.nn.Module:
    """Give a torchvision Mask R-CNN the continuous paste (in place; returns the model)."""
    t = model.transform
    model.transform = ContinuousPasteTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                               size_divisible=t.size_divisible, fixed_size=t.fixed_size,
                                               _skip_resize=t._skip_resize)  # fmt: skip
    return model
