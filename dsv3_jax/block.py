"""One pre-norm decoder block: h += MLA(norm(h)); h += FFN(norm(h)), the FFN dense or MoE."""

from __future__ import annotations

import jax
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, DotGeneral, RMSNorm
from dsv3_jax.mla import MLA
from dsv3_jax.moe import MoE, MoEAux
from dsv3_jax.sharding import constrain

RESIDUAL_AXES = ("batch", "length", "act_embed")  # the residual stream [B, T, D] under a mesh


class DecoderLayer(nnx.Module):
    """Attribute names mirror the HF checkpoint (`self_attn`, `mlp`, the two layernorms)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, use_moe: bool,
                 dot_general: DotGeneral = jax.lax.dot_general):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = MLA(cfg, rngs, dot_general)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.use_moe = use_moe
        self.mlp = (MoE(cfg, rngs, dot_general) if use_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, cfg, rngs, dot_general))

    def __call__(self, h_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, MoEAux | None]:
        h_BTD = constrain(h_BTD + self.self_attn(self.input_layernorm(h_BTD), positions_BT), *RESIDUAL_AXES)
        ffn_in = self.post_attention_layernorm(h_BTD)
        if self.use_moe:
            ffn_out, aux = self.mlp(ffn_in)
            return constrain(h_BTD + ffn_out, *RESIDUAL_AXES), aux
        return constrain(h_BTD + self.mlp(ffn_in), *RESIDUAL_AXES), None
