"""Model configuration: a frozen dataclass with validation, named presets and HF config.json conversion.

Field names follow the HF `config.json` of DeepSeek-V3 so that `from_hf`/`to_hf` are a near-identity and
nobody has to keep two vocabularies in their head. See SEMANTICS.md §1 for the meaning of each field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

DTYPES = ("float32", "bfloat16", "float16")
# "auto" resolves per backend (resolve_moe_dispatch): ragged on GPU/TPU, capacity on CPU.
MOE_DISPATCH = ("auto", "dense", "capacity", "blocked", "ragged")
# ModelConfig fields that say how we compute, not what the architecture is (absent from HF config.json).
COMPUTE_FIELDS = ("dtype", "param_dtype", "moe_dispatch", "capacity_factor", "init_std", "fp8",
                  "fp8_power_of_2_scales", "fp8_accumulation_interval")
# Ablation switches that change the architecture away from DeepSeek-V3 (no HF equivalent: to_hf refuses them).
ABLATION_FIELDS = ("attention",)
ATTENTION_KINDS = ("mla", "mha")  # mha: dsv3_jax/mha.py, the baseline of the MLA experiment
NON_HF_FIELDS = COMPUTE_FIELDS + ABLATION_FIELDS
# FP8 GEMM emulation recipes (dsv3_jax/fp8.py); the rest of the model stays in `dtype` either way.
FP8_RECIPES = ("none", "deepseek", "per_tensor")


class ConfigError(ValueError):
    """A configuration value is impossible; the message starts with the offending field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension (DeepSeek-V3 ships factor 40 over 4096 original positions)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    attention_factor: float | None = None  # explicit cos/sin multiplier; None derives it from the mscales


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of a DeepSeek-V3-style model, plus compute dtypes and MoE dispatch."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = YarnConfig()
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 1
    # Not part of HF's config: how we compute.
    dtype: str = "float32"  # activation / matmul dtype
    param_dtype: str = "float32"  # master weights
    moe_dispatch: str = "auto"
    capacity_factor: float | None = None  # None = dropless (capacity = all tokens)
    init_std: float = 0.006
    attention: str = "mla"  # ablation only: "mha" swaps MLA for standard multi-head attention
    fp8: str = "none"  # FP8 recipe of the Linear GEMMs: none | deepseek (1x128 / 128x128 tiles) | per_tensor
    fp8_power_of_2_scales: bool = False  # round FP8 scales up to powers of two
    fp8_accumulation_interval: int | None = None  # None: exact FP32 accumulation; N: ~14-bit partial sums
    # promoted to FP32 every N elements (tensor-core model, slow; N >= K means never promoted)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mtp_depth(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def kv_cache_dim(self) -> int:
        """Numbers cached per token and layer by absorbed MLA decoding (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_index: int) -> bool:
        return layer_index >= self.first_k_dense_replace

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first impossible field; return self so calls chain."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                     "n_group", "topk_group", "max_position_embeddings"):
            _require_int(self, name, minimum=1)
        for name in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            _require_int(self, name, minimum=0)
        if self.q_lora_rank is not None:
            _require_int(self, "q_lora_rank", minimum=1)
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError("first_k_dense_replace", f"{self.first_k_dense_replace} exceeds "
                              f"num_hidden_layers={self.num_hidden_layers}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.topk_group > self.n_group:
            raise ConfigError("topk_group", f"{self.topk_group} exceeds n_group={self.n_group}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError("n_routed_experts", f"{self.n_routed_experts} experts do not split into "
                              f"n_group={self.n_group} equal groups")
        if self.n_group > 1 and self.experts_per_group < 2:
            raise ConfigError("n_group", "group scores sum the top-2 experts of a group, so each group "
                              f"needs >= 2 experts (got {self.experts_per_group})")
        reachable = self.topk_group * self.experts_per_group
        if self.num_experts_per_tok > reachable:
            raise ConfigError("num_experts_per_tok", f"top-{self.num_experts_per_tok} is more than the "
                              f"{reachable} experts in the topk_group={self.topk_group} kept groups")
        for name in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(name, f"must be a positive number, got {value!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError("norm_topk_prob", f"must be true or false, got {self.norm_topk_prob!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(name, f"must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ConfigError("moe_dispatch", f"must be one of {MOE_DISPATCH}, got {self.moe_dispatch!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError("capacity_factor", f"must be positive or None (dropless), got {self.capacity_factor!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError("attention", f"must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.fp8 not in FP8_RECIPES:
            raise ConfigError("fp8", f"must be one of {FP8_RECIPES}, got {self.fp8!r}")
        if not isinstance(self.fp8_power_of_2_scales, bool):
            raise ConfigError("fp8_power_of_2_scales", f"must be true or false, got {self.fp8_power_of_2_scales!r}")
        if self.fp8_accumulation_interval is not None:
            _require_int(self, "fp8_accumulation_interval", minimum=1)
        if self.fp8 != "none" and self.moe_dispatch == "ragged":
            raise ConfigError("moe_dispatch", "ragged dispatch runs jax.lax.ragged_dot, which has no FP8 "
                              f"emulation; with fp8={self.fp8!r} use capacity, blocked or dense")
        if self.rope_scaling is not None:
            y = self.rope_scaling
            if not y.factor >= 1:
                raise ConfigError("rope_scaling.factor", f"must be >= 1, got {y.factor}")
            if not y.original_max_position_embeddings >= 1:
                raise ConfigError("rope_scaling.original_max_position_embeddings",
                                  f"must be >= 1, got {y.original_max_position_embeddings}")
            if not y.beta_fast > y.beta_slow > 0:
                raise ConfigError("rope_scaling.beta_fast", f"need beta_fast > beta_slow > 0, got "
                                  f"{y.beta_fast} and {y.beta_slow}")
        return self

    # ---- HF config.json ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from an HF DeepSeek-V3 `config.json` (a path, a directory holding one, or a dict)."""
        if isinstance(source, Mapping):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        # HF's own `dtype` key is a storage dtype, not our compute setting: read architecture fields only.
        fields = {f.name for f in dataclasses.fields(cls)} - set(NON_HF_FIELDS) - {"rope_scaling"}
        kwargs = {k: hf[k] for k in fields if k in hf}
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
            kwargs["rope_theta"] = hf["rope_parameters"].get("rope_theta", cls.rope_theta)
        kwargs.update(overrides)
        return cls(**kwargs).validate()

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this architecture (legacy `rope_scaling` key, which HF 5.x reads)."""
        if self.attention != "mla":
            raise ConfigError("attention", f"{self.attention!r} is an ablation; HF's DeepseekV3 has MLA only")
        skip = {*NON_HF_FIELDS, "rope_scaling"}
        hf: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        hf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                  num_key_value_heads=self.num_attention_heads, hidden_act="silu", scoring_func="sigmoid",
                  topk_method="noaux_tc", tie_word_embeddings=False, attention_bias=False,
                  rope_interleave=True, torch_dtype=self.param_dtype)
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        else:
            hf["rope_scaling"] = None
        return hf


def _require_int(cfg: ModelConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")


def _yarn_from_hf(hf: Mapping[str, Any]) -> YarnConfig | None:
    """HF 4.x writes `rope_scaling`; HF 5.x writes `rope_parameters` (which also holds rope_theta)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rope:
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError("rope_scaling", f"only YaRN rope scaling is supported, got {kind!r}")
    defaults = YarnConfig()
    get = lambda key, default: rope[key] if rope.get(key) is not None else default  # noqa: E731
    original = int(get("original_max_position_embeddings", defaults.original_max_position_embeddings))
    factor = get("factor", None)
    if factor is None:  # HF derives it from the context extension itself
        factor = hf.get("max_position_embeddings", original * defaults.factor) / original
    # A *missing* mscale / mscale_all_dim means 0 to HF (no m^2 on the softmax scale, and cos/sin scaled by
    # 0.1 ln(factor) + 1), not V3's 1.0, so absent keys must not take YarnConfig's defaults.
    return YarnConfig(factor=float(factor), original_max_position_embeddings=original,
                      beta_fast=float(get("beta_fast", defaults.beta_fast)),
                      beta_slow=float(get("beta_slow", defaults.beta_slow)),
                      mscale=float(get("mscale", 0.0)), mscale_all_dim=float(get("mscale_all_dim", 0.0)),
                      attention_factor=None if rope.get("attention_factor") is None
                      else float(rope["attention_factor"]))


PRESETS: dict[str, ModelConfig] = {
    # The real thing (HF hub config.json of deepseek-ai/DeepSeek-V3).
    "deepseek-v3-671b": ModelConfig(dtype="bfloat16"),
    # CPU-sized model for training curves and ablations on one machine.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_scaling=None, max_position_embeddings=4096, num_nextn_predict_layers=1,
        moe_dispatch="blocked"),  # the fastest dropless path on one CPU device
    # Seconds-scale model for unit tests: every feature on, every dim tiny.
    "tiny": ModelConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=16), max_position_embeddings=256,
        num_nextn_predict_layers=1),
}


def resolve_moe_dispatch(dispatch: str, backend: str | None = None, fp8: str = "none") -> str:
    """The concrete dispatch for `dispatch` on `backend` (default: JAX's default backend).

    `ragged` rests on `jax.lax.ragged_dot` and `ragged_all_to_all`, which GPU/TPU run as grouped GEMMs; XLA:CPU
    lowers ragged_dot to a masked dense matmul over every expert and cannot run ragged_all_to_all, so CPU
    resolves to `capacity` (exact and dropless by default; the expert axis shards through GSPMD). Under an FP8
    recipe `auto` is `capacity` everywhere: ragged_dot takes no dot_general to emulate FP8 with (validate()
    rejects an explicit ragged + fp8).
    """
    if dispatch != "auto":
        return dispatch
    if fp8 != "none":
        return "capacity"
    if backend is None:
        import jax  # config.py stays importable without touching a backend until a model is built

        backend = jax.default_backend()
    return "capacity" if backend == "cpu" else "ragged"


def get_preset(name: str) -> ModelConfig:
    """A named preset, validated."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].validate()
