"""One pre-norm decoder block: h += MLA(norm(h)); h += FFN(norm(h)), the FFN dense or MoE."""

from __future__ import annotations

import jax
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.kv_cache import LayerEntries
from dsv3_jax.layers import MLP, DotGeneral, RMSNorm
from dsv3_jax.mha import MHA
from dsv3_jax.mla import MLA
from dsv3_jax.moe import MoE, MoEAux
from dsv3_jax.partitioning import constrain

RESIDUAL_AXES = ("batch", "length", "act_embed")  # the residual stream [B, T, D] under a mesh


class DecoderLayer(nnx.Module):
    """Attribute names mirror the HF checkpoint (`self_attn`, `mlp`, the two layernorms)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, use_moe: bool,
                 dot_general: DotGeneral = jax.lax.dot_general):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        # MHA only for the MLA ablation (model.attention="mha"): training and eval, no latent-cache decoding.
        self.self_attn = MHA(cfg, rngs, dot_general) if cfg.attention == "mha" else MLA(cfg, rngs, dot_general)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.use_moe = use_moe
        self.mlp = (MoE(cfg, rngs, dot_general) if use_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, cfg, rngs, dot_general))

    def __call__(self, h_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, MoEAux | None]:
        h_BTD = constrain(h_BTD + self.self_attn(self.input_layernorm(h_BTD), positions_BT), *RESIDUAL_AXES)
        return self._ffn_residual(h_BTD)

    def prefill(self, h_BTD: jax.Array, entries: LayerEntries) -> tuple[jax.Array, LayerEntries]:
        """The block over a prompt starting at position 0, filling this layer's cache slots 0..T-1."""
        attn_BTD, entries = self.self_attn.prefill(self.input_layernorm(h_BTD), entries)
        return self._ffn_residual(constrain(h_BTD + attn_BTD, *RESIDUAL_AXES))[0], entries

    def decode(self, h_BTD: jax.Array, positions_BT: jax.Array,
               entries: LayerEntries) -> tuple[jax.Array, LayerEntries]:
        """The block for T new tokens per row at `positions_BT`, attending to (and extending) the cache.

        MoE layers route each token on its own; equality with the full forward needs dropless dispatch
        (a capacity limit depends on how many tokens share the call)."""
        attn_BTD, entries = self.self_attn.decode(self.input_layernorm(h_BTD), positions_BT, entries)
        return self._ffn_residual(constrain(h_BTD + attn_BTD, *RESIDUAL_AXES))[0], entries

    def _ffn_residual(self, h_BTD: jax.Array) -> tuple[jax.Array, MoEAux | None]:
        ffn_in = self.post_attention_layernorm(h_BTD)
        if self.use_moe:
            ffn_out, aux = self.mlp(ffn_in)
            return constrain(h_BTD + ffn_out, *RESIDUAL_AXES), aux
        return constrain(h_BTD + self.mlp(ffn_in), *RESIDUAL_AXES), None
