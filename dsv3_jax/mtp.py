"""Multi-token prediction modules (docs/semantics.md §6).

Module k (1-based) at position i combines the previous depth's representation h^{k-1}_i with the embedding of
token t_{i+k} and predicts t_{i+k+1}. h^0 is the main model's *post-norm* final hidden state, the embedding
comes *first* in the concatenation (the released weights' order), and embedding and output head are shared
with the main model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.block import RESIDUAL_AXES, DecoderLayer
from dsv3_jax.config import ModelConfig
from dsv3_jax.kv_cache import LayerEntries
from dsv3_jax.layers import DotGeneral, Linear, RMSNorm
from dsv3_jax.moe import MoEAux
from dsv3_jax.partitioning import constrain


class SharedHeadNorm(nnx.Module):
    """Holds `shared_head.norm`; the head matrix itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        self.norm = RMSNorm(cfg.hidden_size, cfg)


class MTPModule(nnx.Module):
    """enorm/hnorm -> eh_proj([emb ; h]) -> one MoE decoder block -> shared_head.norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general):
        self.enorm = RMSNorm(cfg.hidden_size, cfg)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg)
        # [emb ; h] is two hidden vectors side by side: its input dim is not the model's hidden dim (never split)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, cfg, rngs, (None, "embed"))  # high precision
        self.block = DecoderLayer(cfg, rngs, use_moe=True, dot_general=dot_general)
        self.shared_head = SharedHeadNorm(cfg)

    def __call__(self, h_prev_BTD: jax.Array, emb_next_BTD: jax.Array,
                 positions_BT: jax.Array) -> tuple[jax.Array, jax.Array, MoEAux]:
        """(block output h^k [B,T,D] to chain into the next depth, normed head input [B,T,D], MoE aux)."""
        h_BTD, aux = self.block(self._combine(h_prev_BTD, emb_next_BTD), positions_BT)
        return h_BTD, self.shared_head.norm(h_BTD), aux

    def prefill(self, h_prev_BTD: jax.Array, emb_next_BTD: jax.Array,
                entries: LayerEntries) -> tuple[jax.Array, jax.Array, LayerEntries]:
        """`__call__` over positions 0..T-1 that also fills the block's own MLA cache: (h^k, head input, cache)."""
        h_BTD, entries = self.block.prefill(self._combine(h_prev_BTD, emb_next_BTD), entries)
        return h_BTD, self.shared_head.norm(h_BTD), entries

    def decode(self, h_prev_BTD: jax.Array, emb_next_BTD: jax.Array, positions_BT: jax.Array,
               entries: LayerEntries) -> tuple[jax.Array, jax.Array, LayerEntries]:
        """New positions against the block's cache: (h^k, head input, cache). Position i pairs h^{k-1}_i with
        the embedding of t_{i+k}, so the MTP cache of depth k runs k tokens behind the main one."""
        h_BTD, entries = self.block.decode(self._combine(h_prev_BTD, emb_next_BTD), positions_BT, entries)
        return h_BTD, self.shared_head.norm(h_BTD), entries

    def _combine(self, h_prev_BTD: jax.Array, emb_next_BTD: jax.Array) -> jax.Array:
        x_BTD = self.eh_proj(jnp.concatenate([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], axis=-1))
        return constrain(x_BTD, *RESIDUAL_AXES)
