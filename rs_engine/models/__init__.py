"""Networks: selective-scan backbones, FPN neck, Mask R-CNN heads, and ``build_model(config)``."""

from rs_engine.models.build import build_model, count_flops
from rs_engine.models.config import BACKBONES, BASELINES, ModelConfig, SSMBackboneConfig

__all__ = ["BACKBONES", "BASELINES", "ModelConfig", "SSMBackboneConfig", "build_model", "count_flops"]
