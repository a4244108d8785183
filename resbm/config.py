"""The model configuration (`ModelConfig`, presets, boundary kinds and variants).

It lives in `spec.model_config`, torch-free, because the bridge validates a run's model and sizes
its objects without the model library; resbm's modules and users import it from here."""
from spec.model_config import (BOUNDARY_KINDS, BOUNDARY_VARIANTS, DEFAULT_BOTTLENECK_RATIO, DEFAULT_RESBM_VARIANT,
                               PRESETS, ModelConfig)

__all__ = ["BOUNDARY_KINDS", "BOUNDARY_VARIANTS", "DEFAULT_BOTTLENECK_RATIO", "DEFAULT_RESBM_VARIANT", "PRESETS",
           "ModelConfig"]
