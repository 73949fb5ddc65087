"""Model configuration: a frozen dataclass with validation, and the named presets. The HF config.json
translation is `dsv3_jax.hf_config`, what `auto` settings become per backend `dsv3_jax.backend_policy`, the
generic type checks `dsv3_jax.config_fields`.

Field names follow the HF `config.json` of DeepSeek-V3 so that `from_hf`/`to_hf` are a near-identity and
nobody has to keep two vocabularies in their head. See docs/semantics.md §1 for the meaning of each field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dsv3_jax.config_fields import ConfigError, check_field_types

DTYPES = ("float32", "bfloat16", "float16")
# "auto" and every other per-backend choice is decided by backend_policy.choose: ragged everywhere today
# (capacity under an FP8 recipe).
MOE_DISPATCH = ("auto", "dense", "capacity", "blocked", "ragged")
# How `ragged` dispatch runs its grouped GEMMs (moe_ragged.py): tokamax's grouped-matmul kernel (`kernel`, auto on
# GPU/TPU), XLA's ragged_dot (a dense matmul over every expert on GPU/CPU) or padded blocks of rows (`blocks`,
# plain matmuls, ~1.25x the useful FLOPs; auto on CPU).
GROUPED_GEMMS = ("auto", "kernel", "ragged_dot", "blocks")
# Causal attention of training and prefill (dsv3_jax/kernels.py): a fused kernel (`flash`: splash on TPU, tokamax
# on GPU, their reference paths on CPU), XLA's [B, H, T, S] scores (`xla`), or XLA over query chunks of
# `attention_chunk` positions (`chunked`). auto: flash on GPU/TPU; on CPU xla, or chunked with attention_chunk.
ATTENTION_IMPLS = ("auto", "xla", "chunked", "flash")
# The LM head's cross-entropy in training (dsv3_jax/head_loss.py): whole fp32 logits (`xla`) or `chunked` over
# positions with its own backward pass, never holding more than one chunk's logits. auto: chunked on GPU/TPU.
LOSS_IMPLS = ("auto", "xla", "chunked")
# ModelConfig fields that say how we compute, not what the architecture is (absent from HF config.json).
COMPUTE_FIELDS = ("dtype", "param_dtype", "moe_dispatch", "capacity_factor", "init_std", "fp8",
                  "fp8_power_of_2_scales", "fp8_accumulation_interval", "scan_layers", "remat", "attention_chunk",
                  "grouped_gemm", "attention_impl", "loss_impl")
# Ablation switches that change the architecture away from DeepSeek-V3 (no HF equivalent: to_hf refuses them).
ABLATION_FIELDS = ("attention",)
ATTENTION_KINDS = ("mla", "mha")  # mha: dsv3_jax/mha.py, the baseline of the MLA experiment
NON_HF_FIELDS = COMPUTE_FIELDS + ABLATION_FIELDS
# FP8 GEMM emulation recipes (dsv3_jax/fp8.py); the rest of the model stays in `dtype` either way.
FP8_RECIPES = ("none", "deepseek", "per_tensor")
# Rematerialisation policies of a decoder layer's backward pass (dsv3_jax/stack.py says what each one keeps).
REMAT_POLICIES = ("none", "full", "minimal")


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
    scan_layers: bool = True  # dense prefix and MoE layers as two stacks with a leading layer axis, scanned
    remat: str = "none"  # recompute in the backward pass: none | full | minimal (REMAT_POLICIES)
    # Training attention over query chunks of this many positions (None: all at once). Same result; the
    # [B, H, T, S] fp32 scores then exist one [B, H, chunk, S] slice at a time, forward and backward.
    attention_chunk: int | None = None
    grouped_gemm: str = "auto"  # ragged dispatch's grouped GEMM: auto | kernel | ragged_dot | blocks (GROUPED_GEMMS)
    attention_impl: str = "auto"  # auto | xla | chunked | flash (ATTENTION_IMPLS)
    loss_impl: str = "auto"  # auto | xla | chunked (LOSS_IMPLS)

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

    def layer_stacks(self) -> tuple[tuple[str, range, bool], ...]:
        """The scanned layout's stacks: (attribute name, main-layer indices, uses MoE), empty stacks left out.

        Dense layers are the contiguous prefix of `first_k_dense_replace` layers, so scanning the dense stack
        and then the MoE stack applies the layers in their original order."""
        stacks = (("dense_layers", range(0, self.first_k_dense_replace), False),
                  ("moe_layers", range(self.first_k_dense_replace, self.num_hidden_layers), True))
        return tuple(stack for stack in stacks if len(stack[1]))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first impossible field; return self so calls chain.

        Fields are named bare ("hidden_size"); `train.config.Config.validate` re-names them "model.hidden_size".
        """
        check_field_types(self)  # types first: the rules below compare and divide these values
        self._check_sizes()
        self._check_routing()
        self._check_compute()
        if self.rope_scaling is not None:
            _check_yarn(self.rope_scaling)
        return self

    def _check_sizes(self) -> None:
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

    def _check_routing(self) -> None:
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
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be a positive number, got {getattr(self, name)!r}")

    def _check_compute(self) -> None:
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("moe_dispatch", MOE_DISPATCH),
                              ("attention", ATTENTION_KINDS), ("fp8", FP8_RECIPES), ("remat", REMAT_POLICIES),
                              ("grouped_gemm", GROUPED_GEMMS), ("attention_impl", ATTENTION_IMPLS),
                              ("loss_impl", LOSS_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError("capacity_factor", f"must be positive or None (dropless), got {self.capacity_factor!r}")
        if self.fp8_accumulation_interval is not None:
            _require_int(self, "fp8_accumulation_interval", minimum=1)
        if self.attention_chunk is not None:
            _require_int(self, "attention_chunk", minimum=1)
        if self.attention_impl == "chunked" and self.attention_chunk is None:
            raise ConfigError("attention_impl", "chunked attention needs model.attention_chunk (query positions "
                              "per chunk, e.g. 512)")
        if self.fp8 != "none" and self.moe_dispatch == "ragged":
            raise ConfigError("moe_dispatch", "ragged dispatch runs jax.lax.ragged_dot, which has no FP8 "
                              f"emulation; with fp8={self.fp8!r} use capacity, blocked or dense")


# Every size becomes an array dimension or an int32 index (token ids, positions, expert ids): a larger one cannot
# be built, and would fail deep inside JAX instead of here.
MAX_SIZE = 2**31 - 1


def _require_int(cfg: ModelConfig, name: str, minimum: int) -> None:
    """`name` is an int already (check_field_types); this is the range check."""
    value = getattr(cfg, name)
    if value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if value > MAX_SIZE:
        raise ConfigError(name, f"must be at most 2**31 - 1 = {MAX_SIZE} (an array dimension / int32 index), "
                          f"got {value!r}")


def _check_yarn(y: YarnConfig) -> None:
    if not y.factor >= 1:
        raise ConfigError("rope_scaling.factor", f"must be >= 1, got {y.factor}")
    if not y.original_max_position_embeddings >= 1:
        raise ConfigError("rope_scaling.original_max_position_embeddings",
                          f"must be >= 1, got {y.original_max_position_embeddings}")
    if not y.beta_fast > y.beta_slow > 0:
        raise ConfigError("rope_scaling.beta_fast", f"need beta_fast > beta_slow > 0, got "
                          f"{y.beta_fast} and {y.beta_slow}")
    if y.attention_factor is not None and not y.attention_factor > 0:  # it multiplies cos/sin
        raise ConfigError("rope_scaling.attention_factor", f"must be positive or None, got {y.attention_factor}")


PRESETS: dict[str, ModelConfig] = {
    # The real thing (HF hub config.json of deepseek-ai/DeepSeek-V3).
    "deepseek-v3-671b": ModelConfig(dtype="bfloat16"),
    # DeepSeek-V2-Lite's published dims (HF config of deepseek-ai/DeepSeek-V2-Lite: 27 layers, 1 dense, hidden
    # 2048, 16 heads, no q-LoRA, kv_lora 512, 64 routed experts of width 1408 top-6 + 2 shared, vocab 102400)
    # with DeepSeek-V3's features on: sigmoid routing in 8 groups (top-4 groups, as V3's 8/4), the aux-loss-
    # free bias, V3's routed scaling 2.5 and one MTP module. Main model 15.7B total / 2.66B active per token
    # (`params`; 16.3B / 2.75B with MTP): the scale of V3's small MTP and balancing ablations.
    "dsv2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        rope_scaling=None, max_position_embeddings=4096, num_nextn_predict_layers=1, dtype="bfloat16"),
    # The 1B MoE of the aux-loss-free balancing paper (arXiv 2408.15664: hidden 1024, 8 heads, 9 MoE layers,
    # 2 shared + 64 routed experts top-6). The paper leaves the rest unstated; ours: expert width 512 (for ~1B
    # total), MLA at V3's head-dim ratios (nope 64, rope 32, value 64, kv_lora 256, no q-LoRA), V3's 8 routing
    # groups (top-4), a 32K vocabulary, one MTP module. Main model 1.02B total / 0.20B active (1.13B / 0.21B
    # with MTP).
    "moe-1b": ModelConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
        num_hidden_layers=9, first_k_dense_replace=0, num_attention_heads=8, q_lora_rank=None,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        rope_scaling=None, max_position_embeddings=4096, num_nextn_predict_layers=1, dtype="bfloat16"),
    # CPU-sized model for training curves and ablations on one machine.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        # `auto` dispatch: ragged on every backend today (backend_policy.choose), which on one CPU is 8%
        # faster per step than `blocked` (benchmarks/README.md).
        rope_scaling=None, max_position_embeddings=4096, num_nextn_predict_layers=1),
    # Seconds-scale model for unit tests: every feature on, every dim tiny. vocab_size 304: >= 257 for the data
    # pipeline's byte-level BPE (so `train --preset tiny` runs as is), a multiple of 16 for tensor meshes, and
    # small (a 39 kB float32 embedding: test_convert's shard bound). Changing it redraws the random data of
    # the bf16 / FP8 / mesh-equivalence tests, whose tolerances hold with margin for this value: rerun them.
    "tiny": ModelConfig(
        vocab_size=304, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        # YaRN stretching 16 original positions to the 256 it allows: factor = 256 / 16, as HF expects.
        rope_scaling=YarnConfig(factor=16.0, original_max_position_embeddings=16), max_position_embeddings=256,
        num_nextn_predict_layers=1),
}


def get_preset(name: str) -> ModelConfig:
    """A named preset, validated."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].validate()
