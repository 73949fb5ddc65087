"""DeepSeekV3: embed -> decoder blocks -> norm -> lm_head, plus MTP modules; returns (logits, Aux)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv3_jax import fp8
from dsv3_jax.block import RESIDUAL_AXES, DecoderLayer
from dsv3_jax.config import ModelConfig
from dsv3_jax.kv_cache import KVCache
from dsv3_jax.layers import DotGeneral, Embed, Linear, RMSNorm
from dsv3_jax.moe import MoEAux
from dsv3_jax.mtp import MTPModule
from dsv3_jax.partitioning import constrain
from dsv3_jax.stack import call_layer, scan_cached, scan_layers, stacked_layers

LOGITS_AXES = ("batch", "length", "vocab")


@struct.dataclass
class Aux:
    """Side outputs, returned rather than sown so losses and bias updates read them directly.

    MoE statistics are stacked over layers (every field of `MoEAux` gains a leading axis) in both layouts, so
    losses, the bias update and metrics are one vectorised op over layers."""

    moe: MoEAux | None  # main MoE layers in layer order, [L_moe, ...]; None without MoE layers
    mtp_logits: tuple[jax.Array, ...]  # depth k (1-based) at index k-1: [B, T-k, V] float32, predicts t_{i+k+1}
    mtp_moe: tuple[MoEAux, ...]  # one per MTP module that ran (token counts differ by depth, so not stacked)
    layer_outputs: jax.Array | None = None  # residual stream after each main layer [L, B, T, D] (return_hidden)
    final_hidden: jax.Array | None = None  # post-norm hidden state, the lm_head input (return_hidden=True)
    # with head_inputs=True, in place of mtp_logits: depth k's lm_head input [B, T-k, D] (compute dtype)
    mtp_head_inputs: tuple[jax.Array, ...] = ()

    @property
    def n_moe(self) -> int:
        """Main MoE layers reported."""
        return 0 if self.moe is None else self.moe.expert_counts.shape[0]

    def moe_layer(self, index: int) -> MoEAux:
        """Main MoE layer `index`'s statistics (unstacked)."""
        return jax.tree.map(lambda a: a[index], self.moe)

    def per_router(self, field: str) -> jax.Array:
        """`field` of every MoE layer with a router bias, stacked [L_moe + n_mtp, ...]: main layers, then MTP
        blocks (the order of `DeepSeekV3.routers`). Only for fields whose shape does not depend on the tokens
        (expert_counts, the balance losses, dropped_fraction)."""
        parts = ([] if self.moe is None else [getattr(self.moe, field)]) + [
            getattr(aux, field)[None] for aux in self.mtp_moe]
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)


def _stack_aux(per_layer: list[MoEAux]) -> MoEAux | None:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer else None


class DeepSeekV3(nnx.Module):
    """The full model. Attribute names mirror the HF checkpoint so conversion is a table, not code.

    With `cfg.scan_layers` the main layers live in two stacks (`dense_layers`, `moe_layers`: one DecoderLayer
    each whose variables have a leading layer axis, dsv3_jax/stack.py); otherwise in the list `layers`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral | None = None):
        """`dot_general` (default: the one `cfg.fp8` selects) runs every FP8-eligible GEMM: MLA projections,
        dense / shared / routed expert MLPs. Embedding, lm_head, MTP eh_proj, router and attention core stay
        in high precision, as in DeepSeek-V3's FP8 training."""
        cfg.validate()
        self.cfg = cfg
        if dot_general is None:
            dot_general = fp8.dot_general_for(cfg)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, cfg, rngs)
        if cfg.scan_layers:
            for name, indices, use_moe in cfg.layer_stacks():
                setattr(self, name, stacked_layers(cfg, rngs, len(indices), use_moe, dot_general))
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs, use_moe=cfg.is_moe_layer(i), dot_general=dot_general)
                                    for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        # high precision even under FP8
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, cfg, rngs, ("embed", "vocab"))
        self.mtp = nnx.List([MTPModule(cfg, rngs, dot_general) for _ in range(cfg.mtp_depth)])

    def stacks(self) -> list[tuple[DecoderLayer, range]]:
        """The scanned layout's (stack module, main-layer indices), in layer order (empty when unrolled)."""
        if not self.cfg.scan_layers:
            return []
        return [(getattr(self, name), indices) for name, indices, _ in self.cfg.layer_stacks()]

    def routers(self) -> list:
        """Every router, in the order of `Aux.per_router` (main MoE layers, then MTP blocks). In the scanned
        layout the main MoE layers share one router module whose kernel and bias are [L_moe, ...]."""
        if self.cfg.scan_layers:
            main = [stack.mlp.gate for stack, _ in self.stacks() if stack.use_moe]
        else:
            main = [layer.mlp.gate for layer in self.layers if layer.use_moe]
        return main + [module.block.mlp.gate for module in self.mtp]

    def __call__(self, input_ids_BT: jax.Array, return_hidden: bool = False,
                 head_inputs: bool = False) -> tuple[jax.Array, Aux]:
        """Logits [B, T, V] (float32) for every position, and the Aux side outputs.

        `head_inputs=True` stops before the lm_head: the post-norm hidden states [B, T, D] in place of the
        logits, and each MTP depth's head input in `Aux.mtp_head_inputs` (for a loss that applies the head
        itself, head_loss.chunked_cross_entropy)."""
        batch, seq_len = input_ids_BT.shape
        positions_BT = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        h_BTD = constrain(self.embed_tokens(input_ids_BT), *RESIDUAL_AXES)
        h_BTD, moe_aux, layer_outputs = self._main_layers(h_BTD, positions_BT, return_hidden)
        final_BTD = self.norm(h_BTD)
        head = (lambda x: x) if head_inputs else (
            lambda x: constrain(self.lm_head(x).astype(jnp.float32), *LOGITS_AXES))
        main_out = head(final_BTD)

        mtp_out, mtp_aux = [], []
        h_prev_BTD = final_BTD
        for depth, module in enumerate(self.mtp, start=1):
            if seq_len <= depth:
                break  # no position has a token `depth` steps ahead
            n = seq_len - depth
            with jax.named_scope(f"mtp_{depth}"):
                h_prev_BTD, head_in_BTD, aux = call_layer(module, self.cfg.remat, h_prev_BTD[:, :n],
                                                          self.embed_tokens(input_ids_BT[:, depth:]),
                                                          positions_BT[:, :n])
                mtp_out.append(head(head_in_BTD))
            mtp_aux.append(aux)
        return main_out, Aux(moe=moe_aux, mtp_logits=() if head_inputs else tuple(mtp_out),
                             mtp_moe=tuple(mtp_aux), layer_outputs=layer_outputs,
                             final_hidden=final_BTD if return_hidden else None,
                             mtp_head_inputs=tuple(mtp_out) if head_inputs else ())

    def _main_layers(self, h_BTD: jax.Array, positions_BT: jax.Array,
                     keep_hidden: bool) -> tuple[jax.Array, MoEAux | None, jax.Array | None]:
        """Every main layer in order: (output, stacked MoE aux, [L, B, T, D] hidden states if asked)."""
        remat = self.cfg.remat
        moe_aux, hidden = [], []
        if self.cfg.scan_layers:
            for stack, _ in self.stacks():
                with jax.named_scope("moe_layers" if stack.use_moe else "dense_layers"):
                    h_BTD, aux, hidden_LBTD = scan_layers(stack, h_BTD, positions_BT, remat, keep_hidden)
                if aux is not None:
                    moe_aux.append(aux)
                hidden.append(hidden_LBTD)
            moe = moe_aux[0] if moe_aux else None  # at most one MoE stack
            return h_BTD, moe, jnp.concatenate(hidden) if keep_hidden else None
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                h_BTD, aux = call_layer(layer, remat, h_BTD, positions_BT)
            if aux is not None:
                moe_aux.append(aux)
            hidden.append(h_BTD)
        return h_BTD, _stack_aux(moe_aux), jnp.stack(hidden) if keep_hidden else None

    # ---- cached inference (dsv3_jax.generate drives these; caches come from dsv3_jax.kv_cache) ----------------
    def head(self, final_BTD: jax.Array) -> jax.Array:
        """Logits (float32) from post-norm hidden states of any leading shape."""
        return self.lm_head(final_BTD).astype(jnp.float32)

    def prefill(self, input_ids_BT: jax.Array, lengths_B: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Right-padded prompts (row b holds lengths_B[b] real tokens) from position 0 into an empty cache:
        (post-norm hidden [B, T, D] at every position, cache holding each row's prompt)."""
        h_BTD = constrain(self.embed_tokens(input_ids_BT), *RESIDUAL_AXES)
        h_BTD, cache = self._cached_layers("prefill", h_BTD, cache)
        return self.norm(h_BTD), cache.replace(lengths=lengths_B.astype(jnp.int32))

    def decode(self, input_ids_BT: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """T new tokens per row, at positions lengths_B[b] + t: (post-norm hidden [B, T, D], cache with
        lengths + T). Callers that reject some of the T (speculative verification) lower the lengths after."""
        positions_BT = cache.lengths[:, None] + jnp.arange(input_ids_BT.shape[1], dtype=jnp.int32)[None, :]
        h_BTD = constrain(self.embed_tokens(input_ids_BT), *RESIDUAL_AXES)
        h_BTD, cache = self._cached_layers("decode", h_BTD, cache, positions_BT)
        return self.norm(h_BTD), cache.replace(lengths=cache.lengths + input_ids_BT.shape[1])

    def _cached_layers(self, method: str, h_BTD: jax.Array, cache: KVCache, *args: jax.Array) -> tuple[jax.Array, KVCache]:
        """Every main layer's `prefill` / `decode` (by `method`) against its row of the layer-stacked cache."""
        if self.cfg.scan_layers:
            entries = cache.entries
            for stack, indices in self.stacks():
                h_BTD, entries = scan_cached(stack, method, h_BTD, entries, indices.start, *args)
            return h_BTD, cache.replace(entries=entries)
        for i, layer in enumerate(self.layers):
            h_BTD, entries = getattr(layer, method)(h_BTD, *args, cache.layer(i))
            cache = cache.with_layer(i, entries)
        return h_BTD, cache

    def mtp_prefill(self, final_BTD: jax.Array, input_ids_BT: jax.Array, lengths_B: jax.Array,
                    mtp_cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The first MTP module over a prefilled prompt: position i pairs h_i with t_{i+1}, so positions
        0..T-2 are known and the cache ends up one token behind the main one. Returns (head input [B, T-1, D],
        cache). Deeper modules are not cached: speculative decoding drafts with module 1 only."""
        emb_BTD = self.embed_tokens(input_ids_BT[:, 1:])
        _, head_in_BTD, entries = self.mtp[0].prefill(final_BTD[:, :-1], emb_BTD, mtp_cache.layer(0))
        lengths_B = jnp.maximum(lengths_B.astype(jnp.int32) - 1, 0)
        return head_in_BTD, mtp_cache.with_layer(0, entries).replace(lengths=lengths_B)

    def mtp_decode(self, h_prev_BTD: jax.Array, next_ids_BT: jax.Array,
                   mtp_cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The first MTP module at positions mtp_lengths + t, pairing main hidden h_i with token t_{i+1}:
        (head input [B, T, D] whose logits predict t_{i+2}, cache with lengths + T)."""
        positions_BT = mtp_cache.lengths[:, None] + jnp.arange(next_ids_BT.shape[1], dtype=jnp.int32)[None, :]
        _, head_in_BTD, entries = self.mtp[0].decode(h_prev_BTD, self.embed_tokens(next_ids_BT), positions_BT,
                                                     mtp_cache.layer(0))
        return head_in_BTD, mtp_cache.with_layer(0, entries).replace(lengths=mtp_cache.lengths + next_ids_BT.shape[1])


def init_model(cfg: ModelConfig, seed: int = 0, dot_general: DotGeneral | None = None) -> DeepSeekV3:
    """A freshly initialised model (std `cfg.init_std`, unit norms, zero router biases); `dot_general`
    defaults to `cfg.fp8`'s."""
    return DeepSeekV3(cfg, nnx.Rngs(params=seed), dot_general)
