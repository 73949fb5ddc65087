"""dsv3_jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax NNX."""

import importlib
from typing import Any

# Imported on first use (PEP 562): `import dsv3_jax.data...` alone (a data-preparation worker) loads no JAX.
_EXPORTS = {"ConfigError": "config", "ModelConfig": "config", "YarnConfig": "config", "get_preset": "config",
            "Aux": "model", "DeepSeekV3": "model", "init_model": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
