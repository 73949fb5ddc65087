"""Standard multi-head attention (MHA), the baseline of the MLA ablation (`model.attention = "mha"`).

Not part of DeepSeek-V3: it exists so experiments can compare MLA against the attention it replaces at equal
depth and width. Each head has its own keys and values of `v_head_dim` channels, all rotated by RoPE
(LLaMA-style full-dimension rotation, in this codebase's interleaved-pair layout), so a decoder caches
2 x heads x v_head_dim numbers per token and layer instead of MLA's kv_lora_rank + qk_rope_head_dim.

Shape suffixes: B batch, T query positions, S key positions, H heads, K head dim, D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import DotGeneral, Linear
from dsv3_jax.rope import apply_rope, rope_cos_sin, softmax_scale
from dsv3_jax.partitioning import constrain

HEADS_AXES = ("batch", "length", "heads", None)


def mha_head_config(cfg: ModelConfig) -> ModelConfig:
    """The config RoPE tables and the softmax scale are computed from: every head channel is a rope channel."""
    return cfg.replace(qk_nope_head_dim=0, qk_rope_head_dim=cfg.v_head_dim)


def mha_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Keys and values of every head, per token and layer (what MLA's 576-wide latent replaces)."""
    return 2 * cfg.num_attention_heads * cfg.v_head_dim


class MHA(nnx.Module):
    """q/k/v/o projections [D, H*K] / [H*K, D]; same call signature as `MLA.__call__`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general):
        self.cfg = cfg
        width = cfg.num_attention_heads * cfg.v_head_dim
        self.q_proj = Linear(cfg.hidden_size, width, cfg, rngs, ("embed", "heads"), dot_general)
        self.k_proj = Linear(cfg.hidden_size, width, cfg, rngs, ("embed", "heads"), dot_general)
        self.v_proj = Linear(cfg.hidden_size, width, cfg, rngs, ("embed", "heads"), dot_general)
        self.o_proj = Linear(width, cfg.hidden_size, cfg, rngs, ("heads", "embed"), dot_general)

    def _heads(self, y_BTW: jax.Array) -> jax.Array:
        return constrain(y_BTW.reshape(*y_BTW.shape[:2], self.cfg.num_attention_heads, -1), *HEADS_AXES)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        head_cfg = mha_head_config(self.cfg)
        cos, sin = rope_cos_sin(positions_BT, head_cfg)
        q_BTHK = apply_rope(self._heads(self.q_proj(x_BTD)), cos, sin)
        k_BSHK = apply_rope(self._heads(self.k_proj(x_BTD)), cos, sin)
        v_BSHK = self._heads(self.v_proj(x_BTD))
        seq_len = x_BTD.shape[1]
        causal_TS = jnp.tril(jnp.ones((seq_len, seq_len), bool))
        out_BTHK = causal_attention(q_BTHK, k_BSHK, v_BSHK, causal_TS, softmax_scale(head_cfg))
        return self.o_proj(constrain(out_BTHK, *HEADS_AXES).reshape(*x_BTD.shape[:2], -1))


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, mask_TS: jax.Array,
                     scale: float) -> jax.Array:
    """Softmax attention per head; scores and softmax in fp32, as in `mla.attend`."""
    scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
    scores_BHTS = jnp.where(mask_TS, scores_BHTS * scale, -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHK.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
