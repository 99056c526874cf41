"""Joint training of the prompt head as a model's instance mask head (``rs-train train|finetune --head prompt``):
RSPrompter-anchor (Chen et al. 2023, "RSPrompter", arXiv 2306.16269, the anchor-based variant).

The detector trains as a Mask R-CNN does (torchvision's RPN and RoI box-head losses), and the mask loss is the
prompt head's instead of the FCN mask head's (which a ``head = "prompt"`` model does not have): each chip's truth
boxes, jittered, are the box prompts (:func:`training.prompt_head.sample_prompts`, ``box_share`` 1), and each mask
is scored by focal + dice loss against its truth and its predicted IoU by squared error
(:class:`training.prompt_head.PromptObjective`), class-agnostic. The boxes stand in for the detector's: at
inference (:class:`rs_engine.models.prompter.PromptHeadInstances`) the box head's detections are the prompts, and
the jitter (each side moved by up to 10 % of the box's extent, at most 20 px) teaches the head the detector's box
errors. Unlike ``rs-train prompt-head`` (a head on a frozen detector), the mask loss reaches the backbone and FPN
through the stride-16 level the head reads, as the FCN mask loss reaches them through RoIAlign.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.prompt_head import PromptObjective, PromptTrainConfig


def joint_prompts() -> PromptTrainConfig:
    """The prompts of joint training: box prompts only (the instance head is prompted by boxes), 8 objects per chip,
    SAM's jitter (10 % of the extent, at most 20 px)."""
    return PromptTrainConfig(box_share=1.0)


class PromptInstanceLoss(nn.Module):
    """The training losses of a Mask R-CNN whose masks come from its prompt head (see the module docstring).

    ``forward(images, targets) -> losses``, as torchvision's ``MaskRCNN`` in training mode: ``images`` a list of
    (C, H, W) normalised chips of one size, ``targets`` dicts with ``boxes`` (K, 4) x1 y1 x2 y2 px, ``labels`` (K,)
    1..num_classes and ``masks`` (K, H, W) uint8; ``losses`` the RPN's ``loss_objectness`` and ``loss_rpn_box_reg``,
    the box head's ``loss_classifier`` and ``loss_box_reg``, and ``loss_mask`` the prompt head's (mean over the
    prompted objects of 20 x focal + dice + IoU squared error; 0 with a graph for a batch without objects).

    Args:
        model: a ``head = "prompt"`` model (:func:`rs_engine.models.build_model`): ``model.prompt_head`` set and
            ``model.roi_heads`` without a mask head; put in training mode by the loop.
        prompts: how prompts are drawn; default :func:`joint_prompts`.
        seed: of the prompt generator (the loop gives each DDP rank its own; a resumed run draws new prompts).

    Raises:
        ValueError: (forward) chips of different sizes in one batch (the datasets give chips of one size).
    """

    def __init__(self, model: nn.Module, prompts: PromptTrainConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.objective = PromptObjective(model.prompt_head, prompts or joint_prompts())
        self.g = torch.Generator().manual_seed(seed)

    @property
    def prompts(self) -> PromptTrainConfig:
        return self.objective.cfg

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        m = self.model
        # GeneralizedRCNN.forward's steps, keeping the FPN maps for the head (one backbone pass for all losses).
        batch, targets = m.transform(images, targets)
        features = m.backbone(batch.tensors)
        proposals, rpn_losses = m.rpn(batch, features, targets)
        _, box_losses = m.roi_heads(features, proposals, batch.image_sizes, targets)
        sizes = set(batch.image_sizes)
        if len(sizes) != 1:
            raise ValueError(f"PromptInstanceLoss: chips of one size per batch, got {sorted(sizes)}")
        level = m.prompt_head.config.level
        mask_loss, _ = self.objective(features[level], targets, sizes.pop(), self.g)
        return {**rpn_losses, **box_losses, "loss_mask": mask_loss}
