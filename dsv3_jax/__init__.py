"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax NNX."""

from dsv3_jax.config import ConfigError, ModelConfig, YarnConfig, get_preset
from dsv3_jax.model import Aux, DeepSeekV3, init_model

__all__ = ["Aux", "ConfigError", "DeepSeekV3", "ModelConfig", "YarnConfig", "get_preset", "init_model"]
