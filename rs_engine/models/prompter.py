"""Prompted outlining with a Mask R-CNN's own heads: a box or a click in, one object's mask out.

A Mask R-CNN mask head is a box-prompted mask predictor already (RoIAlign of a box on the FPN, then an FCN), and
its box head scores any box for objectness and class. :class:`MaskRCNNPrompter` answers prompts with them over the
features of one image window, computed once (:meth:`MaskRCNNPrompter.embed`) so that a further prompt in the same
window costs only the RoI heads:

- a **box** prompt: the box head classifies the box (its best foreground class), the mask head outlines the object
  inside it;
- a **point** prompt (one or more positive points of one object): candidate boxes are the RPN's proposals that
  contain the points plus boxes of 12 to 192 px of three aspect ratios centred on them; the box head scores and
  refines each; the best-scoring refined boxes that still contain the points are outlined and the first whose mask
  covers every point wins (the click-to-box search of interactive tools built on detectors, e.g. the "box from
  click" step of RSPrompter-anchor's prompt generation, arXiv 2306.16269).

The score is the box head's foreground probability of the chosen box: the head's confidence that the box holds an
object of that class, not a predicted IoU.

:class:`SAMPrompter` answers the same calls with a model's SAM-style prompt head (:mod:`rs_engine.models.prompt_head`,
class-agnostic, trained on the frozen detector or with it): the embedding adds the head's image embedding, a prompt
runs only SAM's prompt encoder and mask decoder, the score is the decoder's predicted IoU, and the class is the box
head's on the mask's bounding box. :func:`prompter_for` picks the prompter a model supports.

:class:`PromptHeadInstances` makes the prompt head a model's instance mask head (RSPrompter-anchor): the detector's
boxes are its prompts. ``load_model`` gives a ``head = "prompt"`` model in it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.models.detection.image_list import ImageList

from rs_engine.models.paste import paste_masks
from rs_engine.models.prompt_head import PAD_MULTIPLE, pad_window, upscale

#: Side lengths (px) and aspect ratios (h / w) of the boxes centred on a click, added to the RPN's proposals so
#: that an object the RPN missed (the reason to click) still gets candidates.
CLICK_BOX_SIDES = (12, 24, 48, 96, 192)
CLICK_BOX_RATIOS = (0.5, 1.0, 2.0)
#: Refined candidate boxes whose masks are computed for a point prompt (the best by box score).
POINT_MASK_CANDIDATES = 8
#: Box prompts decoded at once by :class:`SAMPrompter` (each holds its own copy of the window's decoder state).
BOX_CHUNK = 16


@dataclass
class Embedding:
    """The features of one image window: what every prompt in it reuses.

    Attributes:
        features: the FPN levels, ``{name: (1, C, H/s, W/s)}``.
        proposals: (P, 4) the RPN's proposals, x1 y1 x2 y2 in window pixels.
        size: (H, W) window size in pixels (before padding to a multiple of 32).
    """

    features: OrderedDict[str, torch.Tensor]
    proposals: torch.Tensor
    size: tuple[int, int]


@dataclass
class PromptEmbedding(Embedding):
    """An :class:`Embedding` (``proposals`` empty) with the prompt head's ``image`` embedding (1, D, H'/16, W'/16)
    of the window padded to (H', W'), multiples of 32 px."""

    image: torch.Tensor


@dataclass
class Outline:
    """One prompted object: ``mask`` (H, W) probabilities over the window, ``score`` 0-1 (box head foreground
    probability, or the prompt head's predicted IoU), ``label`` 1..num_classes, ``box`` (4,) the box the mask was
    predicted in (window pixels; for a prompt head's point prompt, the mask's bounding box)."""

    mask: np.ndarray
    score: float
    label: int
    box: np.ndarray


class MaskRCNNPrompter:
    """Box and point prompts answered by a torchvision Mask R-CNN's heads (see the module docstring).

    Args:
        model: a torchvision ``MaskRCNN`` (``rs_engine.models.build_model``); put in eval mode.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.heads = model.roi_heads
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")

    @torch.inference_mode()
    def embed(self, image: np.ndarray | torch.Tensor) -> Embedding:
        """FPN features and RPN proposals of one normalised (C, H, W) image window (any size: zero-padded to a
        multiple of 32 as the model's transform batches images, never resized)."""
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, -w % 32, 0, -h % 32))[None]
        features = self.model.backbone(padded)
        proposals, _ = self.model.rpn(ImageList(padded, [(h, w)]), features)
        return Embedding(features, proposals[0], (h, w))

    def _classify(self, emb: Embedding, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box head on ``boxes`` (K, 4): class probabilities (K, classes + 1) and per-class refined boxes
        (K, classes + 1, 4), clipped to the window."""
        heads = self.heads
        pooled = heads.box_head(heads.box_roi_pool(emb.features, [boxes], [emb.size]))
        logits, deltas = heads.box_predictor(pooled)
        refined = heads.box_coder.decode(deltas, [boxes]).reshape(len(boxes), -1, 4)
        h, w = emb.size
        refined[..., 0::2] = refined[..., 0::2].clamp(0, w)
        refined[..., 1::2] = refined[..., 1::2].clamp(0, h)
        return logits.softmax(-1), refined

    def _masks(self, emb: Embedding, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, H, W) mask probabilities of the mask head for ``boxes`` (K, 4) and their classes ``labels``."""
        heads = self.heads
        pooled = heads.mask_head(heads.mask_roi_pool(emb.features, [boxes], [emb.size]))
        cells = heads.mask_predictor(pooled)[torch.arange(len(boxes)), labels].sigmoid()[:, None]
        return paste_masks(cells, boxes, emb.size)[:, 0]

    @torch.inference_mode()
    def box_masks(self, emb: Embedding, boxes: np.ndarray | torch.Tensor,
                  labels: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks of the objects in given boxes.

        Args:
            boxes: (K, 4) x1 y1 x2 y2 window pixels, the prompts (used as given: the user's box is the extent).
            labels: (K,) classes 1..num_classes whose mask channel to take; None: the box head's best class.

        Returns:
            ``masks`` (K, H, W) probabilities, ``scores`` (K,) box-head probability of the class, ``labels`` (K,).
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(-1, 4)
        probs, _ = self._classify(emb, boxes)
        if labels is None:
            labels = probs[:, 1:].argmax(1) + 1  # the best foreground class
        labels = torch.as_tensor(labels, device=self.device).long()
        scores = probs[torch.arange(len(boxes)), labels]
        return self._masks(emb, boxes, labels), scores, labels

    def box(self, emb: Embedding, box: np.ndarray | torch.Tensor) -> Outline:
        """The object in one box (4,) x1 y1 x2 y2 window pixels."""
        masks, scores, labels = self.box_masks(emb, box)
        return Outline(masks[0].cpu().numpy(), float(scores[0]), int(labels[0]),
                       np.asarray(torch.as_tensor(box, dtype=torch.float32).cpu(), dtype=np.float32))

    @torch.inference_mode()
    def point(self, emb: Embedding, points: np.ndarray | torch.Tensor) -> Outline | None:
        """The object under one or more positive points (P, 2) x y window pixels, or None when no candidate box
        keeps every point inside both its box and its mask."""
        pts = torch.as_tensor(points, dtype=torch.float32, device=self.device).reshape(-1, 2)
        lo, hi = pts.min(0).values, pts.max(0).values
        h, w = emb.size
        candidates = [emb.proposals[_contains(emb.proposals, lo, hi)]]
        centre = (lo + hi) / 2
        for side in CLICK_BOX_SIDES:
            for ratio in CLICK_BOX_RATIOS:
                half = torch.tensor([side / ratio**0.5, side * ratio**0.5], device=self.device) / 2
                half = torch.maximum(half, (hi - lo) / 2 + 2)
                candidates.append(torch.cat([centre - half, centre + half])[None])
        boxes = torch.cat(candidates)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        probs, refined = self._classify(emb, boxes)
        scores, labels = probs[:, 1:].max(1)
        labels = labels + 1
        refined = refined[torch.arange(len(boxes)), labels]
        keep = _contains(refined, lo, hi) & (refined[:, 2] > refined[:, 0]) & (refined[:, 3] > refined[:, 1])
        if not keep.any():
            return None
        scores, labels, refined = scores[keep], labels[keep], refined[keep]
        order = scores.argsort(descending=True)[:POINT_MASK_CANDIDATES]
        masks = self._masks(emb, refined[order], labels[order])
        ix = pts[:, 0].long().clamp(0, w - 1)
        iy = pts[:, 1].long().clamp(0, h - 1)
        covered = (masks[:, iy, ix] > 0.5).all(1)
        if not covered.any():
            return None
        i = int(covered.nonzero()[0])  # candidates are in score order: the best box whose mask covers the click
        j = order[i]
        mask = masks[i].cpu().numpy()
        return Outline(_parts_at(mask, pts.cpu().numpy()), float(scores[j]), int(labels[j]), refined[j].cpu().numpy())


class SAMPrompter(MaskRCNNPrompter):
    """Box and point prompts answered by a model's SAM-style prompt head (``model.prompt_head``, see the module
    docstring); the calls and their results are :class:`MaskRCNNPrompter`'s.

    Args:
        model: a Mask R-CNN with a prompt head (``load_model`` of a file written by ``rs-train prompt-head``).

    Raises:
        AttributeError: the model has no prompt head (use :func:`prompter_for`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.head = model.prompt_head

    @torch.inference_mode()
    def embed(self, image: np.ndarray | torch.Tensor) -> PromptEmbedding:
        """FPN features and the head's image embedding of one normalised (C, H, W) window (any size: zero-padded
        to a multiple of 32, never resized). The one costly step: every prompt in the window reuses it."""
        x = torch.as_tensor(image, dtype=torch.float32, device=self.device)
        features = self.model.backbone(pad_window(x))
        return PromptEmbedding(features, torch.zeros(0, 4, device=self.device), tuple(x.shape[-2:]),
                               self.head.embed(features))

    @torch.inference_mode()
    def box_masks(self, emb: PromptEmbedding, boxes: np.ndarray | torch.Tensor,
                  labels: np.ndarray | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks of the objects in given boxes: the head's single output per box.

        Args:
            boxes: (K, 4) x1 y1 x2 y2 window pixels, the prompts.
            labels: (K,) classes 1..num_classes to report; None: the box head's best class on each mask's
                bounding box (the masks themselves are class-agnostic).

        Returns:
            ``masks`` (K, H, W) probabilities, ``scores`` (K,) predicted IoU (0-1), ``labels`` (K,).
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(-1, 4)
        masks, scores = [], []
        for chunk in boxes.split(BOX_CHUNK):  # the decoder's memory grows with prompts x window pixels
            logits, iou = self.head(emb.image, emb.size, boxes=chunk)
            masks.append(upscale(logits, emb.size)[:, 0].sigmoid())
            scores.append(iou[:, 0].clamp(0, 1))
        masks_t = torch.cat(masks)
        if labels is None:
            labels = self._labels(emb, masks_t, boxes)
        return masks_t, torch.cat(scores), torch.as_tensor(labels, device=self.device).long()

    @torch.inference_mode()
    def point(self, emb: PromptEmbedding, points: np.ndarray | torch.Tensor) -> Outline | None:
        """The object under one or more positive points (P, 2) x y window pixels: of the head's ambiguity-aware
        outputs (SAM's multimask; the head is trained on one click), the one with the highest predicted IoU, kept
        on its parts that hold a point; None when that mask is empty."""
        pts = torch.as_tensor(points, dtype=torch.float32, device=self.device).reshape(-1, 2)
        logits, iou = self.head(emb.image, emb.size, points=pts[None], multimask=True)
        k = int(iou[0].argmax())
        mask = upscale(logits[:, k:k + 1], emb.size)[0, 0].sigmoid()
        if not (mask > 0.5).any():
            return None
        mask = torch.from_numpy(_parts_at(mask.cpu().numpy(), pts.cpu().numpy())).to(self.device)
        box = _mask_boxes(mask[None] > 0.5)
        label = self._labels(emb, mask[None], box)
        return Outline(mask.cpu().numpy(), float(iou[0, k].clamp(0, 1)), int(label[0]), box[0].cpu().numpy())

    def _labels(self, emb: PromptEmbedding, masks: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """(K,) the box head's best foreground class on the bounding box of each of ``masks`` (K, H, W) (the
        ``fallback`` (K, 4) box where a mask is empty)."""
        found = masks > 0.5
        boxes = torch.where(found.flatten(1).any(1)[:, None], _mask_boxes(found), fallback)
        return self._classify(emb, boxes)[0][:, 1:].argmax(1) + 1


def prompter_for(model: torch.nn.Module) -> MaskRCNNPrompter:
    """The prompter a model supports: :class:`SAMPrompter` when it has a prompt head (a ``head = "prompt"`` model
    as ``load_model`` gives it, :class:`PromptHeadInstances`, is unwrapped), else :class:`MaskRCNNPrompter`."""
    if isinstance(model, PromptHeadInstances):
        model = model.model
    return SAMPrompter(model) if hasattr(model, "prompt_head") else MaskRCNNPrompter(model)


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, 4) x1 y1 x2 y2 pixel-edge bounding boxes of boolean (K, H, W) masks (zeros for an empty mask)."""
    k, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).min(1).values
    y2 = torch.where(rows, ar_h + 1, 0).max(1).values
    x1 = torch.where(cols, ar_w, w).min(1).values
    x2 = torch.where(cols, ar_w + 1, 0).max(1).values
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def _contains(boxes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(K,) True where box k holds the rectangle [lo, hi] (points' extent)."""
    return (boxes[:, 0] <= lo[0]) & (boxes[:, 1] <= lo[1]) & (boxes[:, 2] >= hi[0]) & (boxes[:, 3] >= hi[1])


def _parts_at(mask: np.ndarray, points: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``mask`` probabilities kept only on its connected parts (above ``threshold``) that hold one of ``points``
    (x, y): the clicked object, not the neighbours its box reaches."""
    parts, _ = ndimage.label(mask > threshold)
    h, w = mask.shape
    ids = {int(parts[min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)]) for x, y in points} - {0}
    return np.where(np.isin(parts, list(ids)), mask, 0).astype(mask.dtype) if ids else mask


class PromptHeadInstances(torch.nn.Module):
    """RSPrompter-anchor's instance head (Chen et al. 2023, "RSPrompter", arXiv 2306.16269, the anchor-based
    variant, Fig. 3): the detector's boxes, classes and scores (its RPN and RoI box head), with masks from its prompt
    head prompted by those boxes instead of from a Mask R-CNN mask head. The boxes enter as box prompts through SAM's
    prompt encoder (RSPrompter-anchor turns each RoI's pooled features into prompt tokens instead).

    Called as the detector is, in eval mode: a list of normalised (C, H, W) tensors -> a list of dicts with ``boxes``
    (K, 4) x1 y1 x2 y2 px, ``labels`` (K,) 1..num_classes, ``scores`` (K,) 0-1 and ``masks`` (K, 1, H, W)
    probabilities (the head's single output per box, upsampled bilinearly from stride 4). One backbone pass serves
    the detector and the head. ``transform``, ``backbone``, ``rpn``, ``roi_heads`` and ``prompt_head`` are the
    detector's, so callers that tune them (score threshold, no resizing) or read its features work unchanged.

    Args:
        model: a Mask R-CNN with ``prompt_head``: a ``head = "prompt"`` model (``rs-train train --head prompt``,
            trained jointly, no FCN mask head), or one with a head trained on it frozen (``rs-train prompt-head``,
            whose FCN mask head's masks are dropped). Not registered twice: only ``model.*`` is in the state dict.

    Raises:
        AttributeError: the model has no prompt head.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "prompt_head"):
            raise AttributeError("PromptHeadInstances: the model has no prompt head")
        self.model = model

    # Read-through (properties, so the detector's modules are not registered a second time under this module).
    transform = property(lambda self: self.model.transform)
    backbone = property(lambda self: self.model.backbone)
    rpn = property(lambda self: self.model.rpn)
    roi_heads = property(lambda self: self.model.roi_heads)
    prompt_head = property(lambda self: self.model.prompt_head)

    @torch.inference_mode()
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        m = self.model
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        batch, _ = m.transform(images)  # as GeneralizedRCNN.forward: normalise, resize, pad to a multiple of 32
        features = m.backbone(batch.tensors)
        proposals, _ = m.rpn(batch, features)
        detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        embedding = m.prompt_head.embed(features)  # (B, D, H'/16, W'/16); per-pixel LayerNorm: per image
        masks = []
        for i, (det, (h, w)) in enumerate(zip(detections, batch.image_sizes, strict=True)):
            det.pop("masks", None)  # a frozen-head model's FCN masks, replaced by the prompt head's
            grid = (-(-h // PAD_MULTIPLE) * 2, -(-w // PAD_MULTIPLE) * 2)  # this image's cells in the padded batch
            masks.append(box_prompt_masks(m.prompt_head, embedding[i:i + 1, :, : grid[0], : grid[1]], (h, w),
                                          det["boxes"]))  # fmt: skip
        detections = m.transform.postprocess(detections, batch.image_sizes, sizes)
        for det, mask, size in zip(detections, masks, sizes, strict=True):
            if tuple(mask.shape[-2:]) != size:  # the transform resized the image: back to its own pixels
                mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
            det["masks"] = mask
        return detections


def box_prompt_masks(head: torch.nn.Module, embedding: torch.Tensor, size: tuple[int, int],
                     boxes: torch.Tensor) -> torch.Tensor:
    """The prompt head's single-output masks for box prompts in one window, decoded :data:`BOX_CHUNK` at a time.

    Args:
        head: a :class:`~rs_engine.models.prompt_head.PromptHead`.
        embedding: (1, D, h, w) its image embedding of the window padded to (16 h, 16 w) px.
        size: (H, W) the window before padding, px.
        boxes: (K, 4) x1 y1 x2 y2 window px; K may be 0.

    Returns:
        (K, 1, H, W) mask probabilities.

    Raises:
        ValueError: as :meth:`PromptHead.forward` (a size the embedding's grid does not cover).
    """
    if not len(boxes):
        return embedding.new_zeros((0, 1, *size))
    out = []
    for chunk in boxes.split(BOX_CHUNK):  # the decoder's memory grows with prompts x window pixels
        logits, _ = head(embedding, size, boxes=chunk)
        out.append(upscale(logits, size).sigmoid())
    return torch.cat(out)
