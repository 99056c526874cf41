"""A SAM-style prompt head over the FPN of a Mask R-CNN: points and boxes in, class-agnostic masks and their
predicted IoU out.

The head composes segment-anything's own modules (Kirillov et al. 2023, "Segment Anything", arXiv 2304.02643):

- a **neck** as SAM's image encoder ends (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d), from the FPN's stride-16
  map to ``embed_dim`` channels: the *image embedding*, computed once per window (:meth:`PromptHead.embed`);
- SAM's ``PromptEncoder`` (random-Fourier positional encoding of point and box-corner coordinates plus learned
  type embeddings), without its mask-prompt branch;
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
        # have already divided by the window's size (see _normalise). The embedding size only sizes its dense
        # no-mask embedding, which broadcasts over any grid at (1, 1).
        self.prompt_encoder = PromptEncoder(embed_dim=d, image_embedding_size=(1, 1), input_image_size=(1, 1),
                                            mask_in_chans=4)
        del self.prompt_encoder.mask_downscaling  # no mask prompts: no parameters that never train
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
            boxes = _normalise(boxes.reshape(-1, 2, 2), padded).reshape(-1, 4)
        sparse, dense = self.prompt_encoder(points=pts, boxes=boxes, masks=None)
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
