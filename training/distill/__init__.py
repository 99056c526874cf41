"""Distillation pretraining: teachers (:mod:`.teachers`), feature losses and the adaptive perturbation rule
(:mod:`.losses`), dual relation distillation (:mod:`.drd`) and the ``rs-train distill`` objective
(:mod:`.objective`)."""
