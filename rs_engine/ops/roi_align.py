"""Multi-scale RoIAlign for training on CPUs: every level and every RoI in one ``embedding_bag`` (forward and
backward), in place of torchvision's per-level ``roi_align`` whose CPU backward is a scalar loop.

RoIAlign (He et al. 2017, "Mask R-CNN", sec. 3; torchvision's ``roi_align`` with ``aligned=False``, as its
``MultiScaleRoIAlign`` uses it) averages, per output bin, ``sampling_ratio``^2 bilinear samples of the feature map.
Each sample reads 4 pixels, so each bin is a weighted sum of ``4 * sampling_ratio^2`` rows of the channels-last
feature table: exactly what ``torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)`` computes,
with a vectorised backward that scatters whole channel rows. The indices and weights depend only on the boxes (no
gradient flows to boxes, as in torchvision). Why: torchvision's CPU ``roi_align_backward`` recomputes the bilinear
weights per channel and accumulates one float at a time; it took a quarter of a Mask R-CNN training step of the
default model (``bench``-style profile in the issue note), where this takes a few percent.

Only used where a gradient is needed (training); inference keeps torchvision's op, whose outputs this matches to
float32 rounding (``tests/ops/test_roi_align.py``), and ONNX export its per-level op merged by one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def roi_align_table(
    table: Tensor,
    rois: Tensor,
    row_offset: Tensor,
    heights: Tensor,
    widths: Tensor,
    scales: Tensor,
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """RoIAlign of every RoI from a channels-last table of feature-map rows.

    Args:
        table: (rows, C) features; RoI ``r`` reads rows ``row_offset[r] + y * widths[r] + x``.
        rois: (R, 4) boxes x1, y1, x2, y2 in image pixels.
        row_offset, heights, widths: (R,) long: where each RoI's map starts in ``table`` (level and image), and
            its map's height and width.
        scales: (R,) float: feature-map pixels per image pixel of each RoI's level.
        output_size: (PH, PW) bins.
        sampling_ratio: samples per bin along each axis (> 0).

    Returns:
        (R, C, PH, PW), torchvision's ``roi_align(..., aligned=False)`` of each RoI on its map.

    Raises:
        ValueError: ``sampling_ratio`` < 1.
    """
    if sampling_ratio < 1:
        raise ValueError("roi_align_table: sampling_ratio must be >= 1 (the adaptive grid is torchvision's only)")
    ph, pw = output_size
    g = sampling_ratio
    with torch.no_grad():
        s = scales.to(rois.dtype)
        x1, y1, x2, y2 = (rois[:, i] * s for i in range(4))
        yi, wy = _axis_taps(y1, (y2 - y1).clamp(min=1.0), ph, g, heights)
        xi, wx = _axis_taps(x1, (x2 - x1).clamp(min=1.0), pw, g, widths)
        R = rois.shape[0]
        # (R, PH, PW, g, g, 2, 2): every bin's samples and their 4 taps
        rows = (
            row_offset[:, None, None, None, None, None, None]
            + yi[:, :, None, :, None, :, None] * widths[:, None, None, None, None, None, None]
            + xi[:, None, :, None, :, None, :]
        )
        w = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :] / (g * g)
        rows = rows.reshape(R * ph * pw, g * g * 4)
        w = w.reshape(R * ph * pw, g * g * 4).to(table.dtype)
    out = F.embedding_bag(rows, table, per_sample_weights=w, mode="sum")  # (R*PH*PW, C)
    return out.view(R, ph, pw, table.shape[1]).permute(0, 3, 1, 2).contiguous()


def _axis_taps(lo: Tensor, size: Tensor, bins: int, grid: int, extent: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear taps along one axis by torchvision's CPU rules: (R, bins, grid, 2) pixel indices and weights.

    ``lo`` (R,) start and ``size`` (R,) length of each RoI in feature-map pixels; ``extent`` (R,) long: the size
    of each RoI's map. A sample outside [-1, extent] has weight 0; inside, it is clamped to [0, extent - 1].
    """
    step = size / bins
    off = torch.arange(bins, dtype=lo.dtype, device=lo.device)[:, None] + (
        torch.arange(grid, dtype=lo.dtype, device=lo.device)[None, :] + 0.5
    ) / grid
    pos = lo[:, None, None] + off[None] * step[:, None, None]  # (R, bins, grid)
    ext = extent[:, None, None]
    valid = (pos >= -1.0) & (pos <= ext.to(pos.dtype))
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= ext - 1
    low = torch.where(at_edge, (ext - 1).expand_as(low), low)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    high = torch.where(at_edge, low, low + 1)
    frac = pos - low.to(pos.dtype)
    idx = torch.stack([low, high], dim=-1)
    w = torch.stack([1.0 - frac, frac], dim=-1) * valid[..., None]
    return idx, w


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same arguments, level mapping and output), computed by
    :func:`roi_align_table` in one call over all levels whenever a gradient is needed; inference, tracing and ONNX
    export run torchvision's own op. Input: feature maps {name: (B, C, H_l, W_l)}, boxes [(N_i, 4)] per image in
    image pixels, image sizes; output (sum N_i, C, PH, PW)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x, boxes, image_shapes)
        feats = [x[k] for k in self.featmap_names]
        if not (torch.is_grad_enabled() and any(f.requires_grad for f in feats)) or self.sampling_ratio < 1 \
                or torch.jit.is_tracing():
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            super().forward(x, [b[:0] for b in boxes], image_shapes)  # sets scales and the level mapper
        rois = torch.cat(boxes)
        batch = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=rois.device) for i, b in
                           enumerate(boxes)])
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros_like(batch)
        hs = torch.tensor([f.shape[2] for f in feats], device=rois.device)
        ws = torch.tensor([f.shape[3] for f in feats], device=rois.device)
        sizes = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in feats], device=rois.device)
        starts = torch.cumsum(sizes, 0) - sizes
        table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats])
        h, w = hs[levels], ws[levels]
        offset = starts[levels] + batch * h * w
        scales = torch.tensor(self.scales, dtype=rois.dtype, device=rois.device)[levels]
        return roi_align_table(table, rois, offset, h, w, scales, self.output_size, self.sampling_ratio)

    def _export_forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """torchvision's per-level ``roi_align`` for the exported graph, merged by one gather: the level results
        concatenated, then each RoI's row taken back to its place. torchvision's export merges them with a
        ``ScatterElements`` over a zero tensor and an index expanded to (R, C, PH, PW) int64, which cost OpenVINO
        about 13 ms of a 512 px tile (300 proposals, bf16) against under 1 ms for this gather."""
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        order, results = [], []
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            order.append(idx)
            results.append(roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio))
        order = torch.cat(order)
        place = torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0], dtype=order.dtype))
        return torch.cat(results).index_select(0, place)
