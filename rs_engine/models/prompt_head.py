"""A SAM-style prompt head over the FPN of a Mask R-CNN: points and boxes in, class-agnostic masks and their
predicted IoU out.

The head composes segment-anything's own modules (Kirillov et al. 2023, "Segment Anything", arXiv 2304.02643):

- a **neck** as SAM's image encoder ends (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d), from the FPN's stride-16
  map to ``embed_dim`` channels: the *image embedding*, computed once per window (:meth:`PromptHead.embed`);
- SAM's ``PromptEncoder``: random-Fourier positional encoding of point and box-corner coordinates plus learned
  type embeddings (sparse tokens), and, through its mask-prompt branch, the same prompts drawn as a map at stride 4
  (:func:`prompt_maps`, dense: added to every image cell). The dense map is ours, not SAM's (SAM feeds that branch
  a previous mask): trained from scratch, the head learns to place a prompt in tens of steps with it, and had not
  in a hundred without it (4 NWPU chips, box prompts: IoU 0.83 against 0.00 after 100 steps);
- SAM's ``MaskDecoder`` over a ``TwoWayTransformer``: prompt tokens and image embedding attend to each other, then
  ``M`` mask tokens give masks at stride 4 and an IoU head scores each.

A further prompt in the same window costs only the prompt encoder and the decoder. The backbone's features, not
SAM's ViT-H, feed it, as RSPrompter does (Chen et al. 2023, arXiv 2306.16269), and it is trained from scratch on the
frozen detector (:mod:`training.prompt_head`): no SAM weights are used.

Windows of any size: SAM fixes its input (1024 px) and embedding (64 x 64) sizes; here the dense positional encoding
is computed at the embedding's actual grid (``pe_layer((h, w))``) and coordinates are normalised by the padded
window the grid covers (16 px per cell), so a window of 256 x 256 and one of 320 x 1024 px are encoded alike.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Stride in pixels of the image embedding (FPN level ``"2"``) and of the decoder's masks.
EMBED_STRIDE = 16
MASK_STRIDE = 4
#: Windows are zero-padded to a multiple of this (the backbone's coarsest stride) before the backbone runs.
PAD_MULTIPLE = 32


@dataclass
class PromptHeadConfig:
    """Sizes of a :class:`PromptHead` (SAM's decoder is 256 wide; 128 keeps a prompt well under 0.1 s on a CPU).

    Attributes:
        embed_dim: width of the image embedding, prompt tokens and transformer.
        depth: two-way transformer blocks.
        num_heads: attention heads (must divide ``embed_dim // 2``, the attention width after SAM's downsampling).
        mlp_dim: hidden width of the transformer's MLPs.
        multimask_outputs: masks per ambiguous (point) prompt; one more token gives the single-mask output.
        iou_head_depth, iou_head_hidden_dim: the IoU-prediction MLP.
        level: FPN level the neck reads (``"2"``: stride 16).
        fpn_channels: width of that FPN level (the :class:`~rs_engine.models.ModelConfig`'s ``fpn_channels``).
        dense_prompts: also give the prompts as a map at stride 4 (:func:`prompt_maps`) through SAM's mask-prompt
            branch: each image cell then knows where the prompt is without learning to match positional codes.
    """

    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 512
    multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    level: str = "2"
    fpn_channels: int = 128
    dense_prompts: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptHeadConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls(**data)


class PromptHead(nn.Module):
    """SAM's prompt encoder and mask decoder over a stride-16 FPN map (see the module docstring).

    Args:
        config: sizes; the default is the CPU-sized head.

    Raises:
        InputError: segment-anything is not installed.
    """

    def __init__(self, config: PromptHeadConfig | None = None) -> None:
        super().__init__()
        try:
            from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
            from segment_anything.modeling.common import LayerNorm2d
        except ImportError:
            from rs_engine.errors import InputError

            raise InputError("this model has a SAM-style prompt head, which needs segment-anything: "
                             "pip install segment-anything==1.0") from None

        self.config = c = config or PromptHeadConfig()
        d = c.embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(c.fpn_channels, d, 1, bias=False), LayerNorm2d(d),
            nn.Conv2d(d, d, 3, padding=1, bias=False), LayerNorm2d(d),
        )  # fmt: skip
        # SAM's encoder divides (p + 0.5) by its fixed input size; with a unit input size it takes coordinates we
        # have already divided by the window's size (see _normalise). Its fixed embedding size is never used: the
        # dense positional code is computed per grid (forward), the mask branch is convolutional, and the no-mask
        # embedding broadcasts from (1, 1).
        self.prompt_encoder = PromptEncoder(embed_dim=d, image_embedding_size=(1, 1), input_image_size=(1, 1),
                                            mask_in_chans=16)
        # Keep only the dense branch in use, so that no parameter sits untrained in the model file.
        delattr(self.prompt_encoder, "no_mask_embed" if c.dense_prompts else "mask_downscaling")
        self.mask_decoder = MaskDecoder(
            transformer_dim=d,
            transformer=TwoWayTransformer(depth=c.depth, embedding_dim=d, num_heads=c.num_heads, mlp_dim=c.mlp_dim),
            num_multimask_outputs=c.multimask_outputs, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
        )  # fmt: skip

    def embed(self, features: OrderedDict[str, Tensor] | dict[str, Tensor]) -> Tensor:
        """The image embedding of one window.

        Args:
            features: the FPN's maps (``model.backbone(x)``); level ``config.level`` is (1, fpn_channels, H/16, W/16)
                for a window padded to (H, W), multiples of 32 px.

        Returns:
            (1, embed_dim, H/16, W/16).

        Raises:
            KeyError: the features lack the configured level.
        """
        return self.neck(features[self.config.level])

    def forward(self, embedding: Tensor, size: tuple[int, int], points: Tensor | None = None,
                point_labels: Tensor | None = None, boxes: Tensor | None = None,
                multimask: bool = False) -> tuple[Tensor, Tensor]:
        """Masks for ``K`` prompts in one window (SAM's ``MaskDecoder.forward``, arXiv 2304.02643 sec. 3).

        Args:
            embedding: (1, D, h, w) from :meth:`embed`.
            size: (H, W) the window in pixels before padding (the padded window is (16 h, 16 w)).
            points: (K, P, 2) x y window pixels, or None.
            point_labels: (K, P) 1 positive, 0 negative, -1 padding; None with points: all positive.
            boxes: (K, 4) x1 y1 x2 y2 window pixels, or None. Points and boxes together: one prompt each per k.
            multimask: True: the ``multimask_outputs`` masks for ambiguous prompts (one point); False: the single
                mask (boxes, several points).

        Returns:
            ``logits`` (K, M, ceil(H/4), ceil(W/4)) mask logits at stride 4 and ``iou_pred`` (K, M) predicted IoU
            of each mask with its object; M = ``multimask_outputs`` or 1.

        Raises:
            ValueError: no prompt, a batch of windows, a size the grid does not cover, or shapes that disagree.
        """
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"embedding must be (1, D, h, w) for one window, got {tuple(embedding.shape)}")
        h, w = embedding.shape[-2:]
        padded = (h * EMBED_STRIDE, w * EMBED_STRIDE)
        H, W = size  # noqa: N806
        if not (padded[0] - PAD_MULTIPLE < H <= padded[0] and padded[1] - PAD_MULTIPLE < W <= padded[1]):
            raise ValueError(f"window {H}x{W} px does not fit an embedding grid of {h}x{w} cells")
        if points is None and boxes is None:
            raise ValueError("give points, boxes or both")
        pts = None
        if points is not None:
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must be (K, P, 2), got {tuple(points.shape)}")
            if point_labels is None:
                point_labels = torch.ones(points.shape[:2], device=points.device)
            if point_labels.shape != points.shape[:2]:
                raise ValueError(f"point_labels must be {tuple(points.shape[:2])}, got {tuple(point_labels.shape)}")
            pts = (_normalise(points, padded), point_labels)
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or (points is not None and len(boxes) != len(points)):
                raise ValueError(f"boxes must be (K, 4) with K as points', got {tuple(boxes.shape)}")
        corners = None if boxes is None else _normalise(boxes.reshape(-1, 2, 2), padded).reshape(-1, 4)
        maps = prompt_maps((4 * h, 4 * w), points, point_labels, boxes) if self.config.dense_prompts else None
        sparse, dense = self.prompt_encoder(points=pts, boxes=corners, masks=maps)
        image_pe = self.prompt_encoder.pe_layer((h, w))[None]
        logits, iou = self.mask_decoder(image_embeddings=embedding, image_pe=image_pe,
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=multimask)  # fmt: skip
        return logits[..., : -(-H // MASK_STRIDE), : -(-W // MASK_STRIDE)], iou


def upscale(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Stride-4 logits (K, M, ceil(H/4), ceil(W/4)) to the window's pixels (K, M, H, W), bilinear (as SAM's
    ``postprocess_masks``), aligned so that stride-4 cell i covers pixels 4i..4i+3."""
    up = F.interpolate(logits, scale_factor=MASK_STRIDE, mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]


def pad_window(image: Tensor) -> Tensor:
    """(C, H, W) -> (1, C, H', W') zero-padded at the bottom and right to multiples of 32 (as the detector's
    transform batches images; never resized)."""
    h, w = image.shape[-2:]
    return F.pad(image, (0, -w % PAD_MULTIPLE, 0, -h % PAD_MULTIPLE))[None]


def prompt_maps(grid: tuple[int, int], points: Tensor | None = None, point_labels: Tensor | None = None,
                boxes: Tensor | None = None, sigma: float = 1.5) -> Tensor:
    """Prompts drawn as maps on the stride-4 grid (the click maps of interactive segmentation, e.g. RITM, Sofiiuk et
    al. 2022): 1 inside a box, plus a Gaussian bump of ``sigma`` cells at each point, +1 positive, -1 negative.

    Args:
        grid: (h4, w4) stride-4 cells of the padded window.
        points: (K, P, 2) x y px; point_labels (K, P) (-1 padding is not drawn). boxes: (K, 4) x1 y1 x2 y2 px.

    Returns:
        (K, 1, h4, w4) float.
    """
    ref = points if points is not None else boxes
    k = len(ref)
    ys = (torch.arange(grid[0], device=ref.device, dtype=torch.float32) + 0.5) * MASK_STRIDE
    xs = (torch.arange(grid[1], device=ref.device, dtype=torch.float32) + 0.5) * MASK_STRIDE
    out = torch.zeros(k, 1, *grid, device=ref.device)
    if boxes is not None:
        b = boxes.float()
        inside_x = (xs >= b[:, 0:1]) & (xs <= b[:, 2:3])  # (K, w4): cell centres inside the box
        inside_y = (ys >= b[:, 1:2]) & (ys <= b[:, 3:4])
        out[:, 0] += (inside_y[:, :, None] & inside_x[:, None, :]).float()
    if points is not None:
        p = points.float() + 0.5
        d2 = ((ys[None, None, :, None] - p[..., 1, None, None]) ** 2
              + (xs[None, None, None, :] - p[..., 0, None, None]) ** 2)  # (K, P, h4, w4)
        bump = torch.exp(-d2 / (2 * (sigma * MASK_STRIDE) ** 2))
        sign = torch.where(point_labels == 1, 1.0, torch.where(point_labels == 0, -1.0, 0.0))
        out[:, 0] += (bump * sign[..., None, None]).sum(1)
    return out


def attach_prompt_head(model: nn.Module, config: PromptHeadConfig | dict[str, Any]) -> PromptHead:
    """Give a detector its prompt head: ``model.prompt_head`` (its tensors then save as ``prompt_head.*``).

    Raises:
        TypeError: a config dict with unknown keys.
        InputError: segment-anything is not installed.
    """
    if isinstance(config, dict):
        config = PromptHeadConfig.from_dict(config)
    model.prompt_head = PromptHead(config)
    return model.prompt_head


def _normalise(coords: Tensor, padded: tuple[int, int]) -> Tensor:
    """(..., N, 2) x y pixels -> what SAM's encoder (unit input size) turns into pixel centres in [0, 1]: it adds
    0.5 before dividing, so give it (p + 0.5) / size - 0.5."""
    scale = torch.tensor([padded[1], padded[0]], dtype=torch.float32, device=coords.device)
    return (coords.float() + 0.5) / scale - 0.5
