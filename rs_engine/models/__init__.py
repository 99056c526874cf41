"""Networks: selective-scan and heat-conduction backbones, FPN neck, Mask R-CNN heads, and ``build_model(config)``."""

from rs_engine.models.build import build_backbone, build_model, count_flops
from rs_engine.models.config import BACKBONES, BASELINES, HeatBackboneConfig, ModelConfig, SSMBackboneConfig

__all__ = [
    "BACKBONES",
    "BASELINES",
    "HeatBackboneConfig",
    "ModelConfig",
    "SSMBackboneConfig",
    "build_backbone",
    "build_model",
    "count_flops",
]
