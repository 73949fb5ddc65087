"""HF `config.json` <-> `ModelConfig`: the translation `convert` and `generate --hf` use (field names are HF's,
so it is nearly the identity; what differs is YaRN's two spellings, HF's defaults for absent keys, and the
architectures HF allows that DeepSeek-V3 does not).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Mapping

from dsv3_jax.config import NON_HF_FIELDS, ModelConfig, YarnConfig
from dsv3_jax.config_fields import ConfigError, coerce_float, is_finite, is_number, read_json_object


def from_hf(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Build from an HF DeepSeek-V3 `config.json` (a path, a directory holding one, or a dict).

    Every problem is a ConfigError naming the field, and the file when there is one.
    """
    if isinstance(source, Mapping):
        return _from_hf_dict(dict(source), overrides)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}")
    hf = read_json_object(path, "the model's fields")
    try:
        return _from_hf_dict(hf, overrides)
    except ConfigError as err:
        raise ConfigError(err.field, f"{err.message} (in {path})") from None


def _from_hf_dict(hf: dict[str, Any], overrides: Mapping[str, Any]) -> ModelConfig:
    # HF's own `dtype` key is a storage dtype, not our compute setting: read architecture fields only.
    hints = typing.get_type_hints(ModelConfig)
    fields = set(hints) - set(NON_HF_FIELDS) - {"rope_scaling"}
    kwargs = {k: coerce_float(hf[k], hints[k]) for k in fields if k in hf}
    if "num_nextn_predict_layers" not in hf and "num_mtp_layers" in hf:
        kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    if "num_key_value_heads" in hf and hf["num_key_value_heads"] != hf.get("num_attention_heads"):
        raise ConfigError("num_key_value_heads", "MLA needs num_key_value_heads == num_attention_heads")
    if hf.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings", "DeepSeek-V3 does not tie embeddings and head")
    if hf.get("rope_interleave", True) is not True:
        raise ConfigError("rope_interleave", "only interleaved RoPE (the DeepSeek weights' layout) is supported")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError("scoring_func", f"only sigmoid routing (V3) is supported, got {hf['scoring_func']!r}")
    kwargs["rope_scaling"] = _yarn_from_hf(hf)
    if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), Mapping):
        theta = hf["rope_parameters"].get("rope_theta", ModelConfig.rope_theta)
        kwargs["rope_theta"] = coerce_float(theta, hints["rope_theta"])
    kwargs.update(overrides)
    return ModelConfig(**kwargs).validate()


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF `config.json` dict for this architecture (legacy `rope_scaling` key, which HF 5.x reads)."""
    if cfg.attention != "mla":
        raise ConfigError("attention", f"{cfg.attention!r} is an ablation; HF's DeepseekV3 has MLA only")
    skip = {*NON_HF_FIELDS, "rope_scaling"}
    hf: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
    hf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
              num_key_value_heads=cfg.num_attention_heads, hidden_act="silu", scoring_func="sigmoid",
              topk_method="noaux_tc", tie_word_embeddings=False, attention_bias=False,
              rope_interleave=True, torch_dtype=cfg.param_dtype)
    if cfg.rope_scaling is not None:
        hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(cfg.rope_scaling)}
    else:
        hf["rope_scaling"] = None
    return hf


def _yarn_from_hf(hf: Mapping[str, Any]) -> YarnConfig | None:
    """HF 4.x writes `rope_scaling`; HF 5.x writes `rope_parameters` (which also holds rope_theta)."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key)
    if not rope:
        return None
    if not isinstance(rope, Mapping):
        raise ConfigError(key, f"must be an object or null, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(key, f"only YaRN rope scaling is supported, got {kind!r}")
    defaults = YarnConfig()

    def number(name: str, default: float) -> float:  # an explicit null counts as absent, as in HF
        return _hf_float(default if rope.get(name) is None else rope[name], f"{key}.{name}")

    original = rope.get("original_max_position_embeddings")
    original = _hf_int(defaults.original_max_position_embeddings if original is None else original,
                       f"{key}.original_max_position_embeddings")
    if rope.get("factor") is not None:
        factor = number("factor", defaults.factor)
    else:  # HF derives it from the context extension itself
        factor = _hf_float(hf.get("max_position_embeddings", original * defaults.factor),
                           "max_position_embeddings") / original
    # A *missing* mscale / mscale_all_dim means 0 to HF (no m^2 on the softmax scale, and cos/sin scaled by
    # 0.1 ln(factor) + 1), not V3's 1.0, so absent keys must not take YarnConfig's defaults.
    return YarnConfig(factor=factor, original_max_position_embeddings=original,
                      beta_fast=number("beta_fast", defaults.beta_fast),
                      beta_slow=number("beta_slow", defaults.beta_slow),
                      mscale=number("mscale", 0.0), mscale_all_dim=number("mscale_all_dim", 0.0),
                      attention_factor=None if rope.get("attention_factor") is None
                      else number("attention_factor", 1.0))


def _hf_float(value: Any, field: str) -> float:
    if not is_number(value):
        raise ConfigError(field, f"must be a number, got {value!r}")
    if not is_finite(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    return float(value)


def _hf_int(value: Any, field: str) -> int:
    """A positive int; HF writers sometimes emit 4096.0, which is taken as 4096."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(field, f"must be an integer >= 1, got {value!r}")
    return value
