"""DeepSeekMoE (docs/semantics.md §5): sigmoid router with a selection-only bias and group-limited top-k,
routed experts with interchangeable dispatch strategies, and always-on shared experts.

Shape suffixes: N tokens, E routed experts, G groups, K experts per token, D hidden, F expert width,
C expert capacity, A = N*K token-expert assignments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv3_jax.backend_policy import SPILL_BLOCK_ROWS, SPILL_CAPACITY_FACTOR, Implementation
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, DotGeneral, normal_init, quantised_if
from dsv3_jax.moe_ragged import (_blocked_grouped_swiglu, block_layout, ragged_experts, ragged_experts_ep,
                                 sort_by_expert)
from dsv3_jax.remat_names import EXPERT_GATE, EXPERT_UP, tag
from dsv3_jax.partitioning import active_plan, constrain, implementation, param


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias: used only to select experts, moved by load after every step.

    It is deliberately not an `nnx.Param`, so `nnx.split(model, nnx.Param, ...)` keeps it away from the
    optimizer and from gradients.
    """


@struct.dataclass
class MoEAux:
    """What one MoE layer reports for losses, bias updates and metrics."""

    expert_counts: jax.Array  # [E] float32: tokens routed to each expert in this batch
    seq_balance_loss: jax.Array  # scalar: V3's sequence-wise balance loss (without alpha), mean over sequences
    batch_balance_loss: jax.Array  # scalar: the same statistic over the whole batch (classic expert-level loss)
    dropped_fraction: jax.Array  # scalar: assignments dropped by a capacity limit (0 when dropless)
    topk_idx: jax.Array  # [N, K] int32 chosen experts
    topk_weight: jax.Array  # [N, K] float32 gate weights (normalised, scaled)


def route(logits_NE: jax.Array, bias_E: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Group-limited sigmoid top-k. Returns (topk_idx [N,K], topk_weight [N,K], scores [N,E]), all fp32 math.

    The bias shifts which experts are *chosen*; the weights come from the unbiased sigmoid scores.
    """
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    biased_NE = scores_NE + bias_E.astype(jnp.float32)[None, :]
    if cfg.n_group > 1:
        n_tokens = biased_NE.shape[0]
        grouped_NGe = biased_NE.reshape(n_tokens, cfg.n_group, cfg.experts_per_group)
        group_score_NG = jax.lax.top_k(grouped_NGe, 2)[0].sum(-1)
        _, kept_groups = jax.lax.top_k(group_score_NG, cfg.topk_group)
        keep_NG = jnp.zeros((n_tokens, cfg.n_group), bool).at[jnp.arange(n_tokens)[:, None], kept_groups].set(True)
        keep_NE = jnp.repeat(keep_NG, cfg.experts_per_group, axis=1)
        biased_NE = jnp.where(keep_NE, biased_NE, -jnp.inf)
    _, topk_idx_NK = jax.lax.top_k(biased_NE, cfg.num_experts_per_tok)
    weight_NK = jnp.take_along_axis(scores_NE, topk_idx_NK, axis=-1)
    if cfg.norm_topk_prob:
        weight_NK = weight_NK / (weight_NK.sum(-1, keepdims=True) + 1e-20)
    return topk_idx_NK.astype(jnp.int32), weight_NK * cfg.routed_scaling_factor, scores_NE


def balance_losses(scores_BTE: jax.Array, topk_idx_BTK: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
    """(sequence-wise, batch-wise) balance loss sum_i f_i * P_i with f_i = E/(K*T) * count_i, P_i = mean s'_i.

    s' = s / sum_j s_j are the affinities normalised over all experts (V3 eq. 17-20); alpha is applied by the
    trainer. The sequence-wise variant averages the per-sequence loss over the batch.
    """
    batch, seq_len, top_k = topk_idx_BTK.shape
    probs_BTE = scores_BTE / scores_BTE.sum(-1, keepdims=True)
    # Scatter-add rather than one_hot(...).sum: a [B, T, K, E] one-hot is 4*K bytes per token and expert.
    counts_BE = jnp.zeros((batch, n_experts), jnp.float32).at[
        jnp.arange(batch)[:, None], topk_idx_BTK.reshape(batch, -1)].add(1.0)
    f_BE = counts_BE * n_experts / (top_k * seq_len)
    seq_loss = jnp.mean(jnp.sum(f_BE * probs_BTE.mean(1), -1))
    batch_loss = jnp.sum(f_BE.mean(0) * probs_BTE.mean((0, 1)))
    return seq_loss, batch_loss


class Router(nnx.Module):
    """Gate weight [D, E] (used in fp32, as HF does) plus the selection-only bias."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernel = param(normal_init(rngs, (cfg.hidden_size, cfg.n_routed_experts), cfg), "embed", "router")
        self.bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), out_sharding=("router",),
                               eager_sharding=False)

    def __call__(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits_NE = jnp.dot(x_ND.astype(jnp.float32), self.kernel[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        return route(logits_NE, self.bias[...], self.cfg)


def _per_expert_matmul(dot_general: DotGeneral, x_EMK: jax.Array, w_EKN: jax.Array) -> jax.Array:
    """One GEMM per expert or block, "emk,ekn->emn", with the expert dim as a dot_general batch dim."""
    return dot_general(x_EMK, w_EKN, (((2,), (1,)), ((0,), (0,))))


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored stacked ([E, D, F] / [E, F, D]) for batched matmuls and expert sharding."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general):
        self.cfg = cfg
        self.dot_general = dot_general  # the expert GEMMs run through it (FP8 recipes replace it)
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        quantised = quantised_if(dot_general)
        self.gate_proj = param(normal_init(rngs, (e, d, f), cfg), "experts", "embed", "expert_mlp", **quantised)
        self.up_proj = param(normal_init(rngs, (e, d, f), cfg), "experts", "embed", "expert_mlp", **quantised)
        self.down_proj = param(normal_init(rngs, (e, f, d), cfg), "experts", "expert_mlp", "embed", **quantised)

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        dtype = jnp.dtype(self.cfg.dtype)
        return tuple(w[...].astype(dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))

    def __call__(self, x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Weighted sum of each token's chosen experts: (out [N, D], dropped fraction). Which path runs is
        backend_policy.choose's answer for this backend, mesh and token count."""
        impl = implementation(self.cfg, x_ND.shape[0])
        if impl.moe_dispatch == "capacity":
            return self.capacity(x_ND, topk_idx_NK, topk_weight_NK, spill=impl.capacity_spill)
        if impl.moe_dispatch == "ragged" or impl.expert_parallel:
            # `blocked` under expert parallelism: the same block-padded GEMM on each shard's own experts, after
            # ragged's exchange (whose capacity_factor then applies)
            return self.ragged(x_ND, topk_idx_NK, topk_weight_NK, impl)
        if impl.moe_dispatch == "blocked":
            return self.blocked(x_ND, topk_idx_NK, topk_weight_NK, impl.block_rows), jnp.float32(0.0)
        return self.dense(x_ND, topk_idx_NK, topk_weight_NK), jnp.float32(0.0)

    def dense(self, x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array) -> jax.Array:
        """Oracle: every expert on every token, combined with a [N, E] weight matrix (zeros for unchosen)."""
        gate_EDF, up_EDF, down_EFD = self._weights()
        x_ND = x_ND.astype(gate_EDF.dtype)
        every_expert = (((1,), (1,)), ((), ()))  # "nd,edf->nef"
        h_NEF = (jax.nn.silu(tag(self.dot_general(x_ND, gate_EDF, every_expert), EXPERT_GATE))
                 * tag(self.dot_general(x_ND, up_EDF, every_expert), EXPERT_UP))
        y_NED = self.dot_general(h_NEF, down_EFD, (((2,), (1,)), ((1,), (0,)))).transpose(1, 0, 2)  # via [E, N, D]
        combine_NE = jnp.zeros((x_ND.shape[0], self.cfg.n_routed_experts), jnp.float32)
        combine_NE = combine_NE.at[jnp.arange(x_ND.shape[0])[:, None], topk_idx_NK].add(topk_weight_NK)
        return jnp.einsum("ned,ne->nd", y_NED.astype(jnp.float32), combine_NE).astype(x_ND.dtype)

    def capacity(self, x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array,
                 spill: bool = False) -> tuple[jax.Array, jax.Array]:
        """Sort assignments by expert into fixed [E, C] buffers, run a batched einsum, gather back.

        Capacity C is every token (dropless, DeepSeek-V3's semantics) unless `capacity_factor` is set, in
        which case C = ceil(factor * N * K / E) and the overflow (latest tokens first) is dropped and reported.
        With `spill` (dropless, one device, many experts: backend_policy.choose) each expert gets
        SPILL_CAPACITY_FACTOR x its fair share of slots and the assignments past them run through the
        block-padded grouped GEMM, instead of E x N slots. Under a mesh the buffers are split over `expert` (GSPMD inserts the all-to-all) and F over `tensor`.

        Both directions are gathers of whole rows: the buffer reads `x` through a slot -> token table, and each
        token reads its K result rows through a token -> slot table. Only int32 tables are scattered, so no
        [E*C, D] or [N, D] float scatter (and its zero-filled temporary) exists in the forward pass.
        """
        cfg = self.cfg
        n_tokens, top_k = topk_idx_NK.shape
        n_experts = cfg.n_routed_experts
        cap = (expert_capacity(n_tokens, top_k, n_experts, SPILL_CAPACITY_FACTOR) if spill
               else expert_capacity(n_tokens, top_k, n_experts, cfg.capacity_factor))
        order_A, sorted_expert_A, token_A, counts_E, rank_A = sort_by_expert(topk_idx_NK, n_experts)
        kept_A = rank_A < cap
        n_slots = n_experts * cap  # slot n_slots is the "nothing here" row: zeros in, dropped out
        slot_A = jnp.where(kept_A, sorted_expert_A * cap + rank_A, n_slots)
        token_S = jnp.full((n_slots + 1,), n_tokens, jnp.int32).at[slot_A].set(token_A.astype(jnp.int32))[:n_slots]

        gate_EDF, up_EDF, down_EFD = self._weights()
        x_ND = x_ND.astype(gate_EDF.dtype)
        if spill:  # the assignments past an expert's `cap` slots, compacted in expert order after the slots
            spill_E = jnp.maximum(counts_E - cap, 0)
            spill_start_E = jnp.cumsum(spill_E) - spill_E
            spill_row_A = jnp.where(kept_A, n_tokens * top_k, spill_start_E[sorted_expert_A] + rank_A - cap)
            spill_RD = jnp.zeros((n_tokens * top_k, x_ND.shape[1]), x_ND.dtype).at[spill_row_A].set(
                x_ND[token_A], mode="drop")
            y_spill_RD = _blocked_grouped_swiglu(spill_RD, gate_EDF, up_EDF, down_EFD, spill_E, block=SPILL_BLOCK_ROWS)
            slot_A = jnp.where(kept_A, slot_A, n_slots + 1 + spill_row_A)
        slot_NK = jnp.zeros((n_tokens * top_k,), jnp.int32).at[order_A].set(slot_A).reshape(n_tokens, top_k)
        x_pad_ND = jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])  # row N: empty slot
        buffer_ECD = constrain(x_pad_ND[token_S].reshape(n_experts, cap, -1), "experts", None, "act_embed")
        h_ECF = (jax.nn.silu(tag(_per_expert_matmul(self.dot_general, buffer_ECD, gate_EDF), EXPERT_GATE))
                 * tag(_per_expert_matmul(self.dot_general, buffer_ECD, up_EDF), EXPERT_UP))
        h_ECF = constrain(h_ECF, "experts", None, "expert_mlp")
        y_ECD = constrain(_per_expert_matmul(self.dot_general, h_ECF, down_EFD), "experts", None, "act_embed")
        y_pad_SD = jnp.concatenate([y_ECD.reshape(n_slots, -1), jnp.zeros((1, y_ECD.shape[-1]), y_ECD.dtype)]
                                   + ([y_spill_RD.astype(y_ECD.dtype)] if spill else []))
        y_NKD = y_pad_SD[slot_NK]  # dropped assignments read the zero row, spilled ones their spill row
        out_ND = jnp.sum(y_NKD.astype(jnp.float32) * topk_weight_NK.astype(jnp.float32)[..., None], axis=1)
        dropped = jnp.float32(0.0) if spill else jnp.sum(~kept_A, dtype=jnp.float32) / kept_A.size
        return constrain(out_ND.astype(x_ND.dtype), "batch", "act_embed"), dropped

    def blocked(self, x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array,
                block: int) -> jax.Array:
        """Dropless grouped matmul with static shapes: each expert's sorted assignments are padded to whole
        blocks of `block` rows, and every block is multiplied by its own expert's weights.

        Work is A + E*(block-1) rows at most (A = N*K) instead of the E*N rows of dropless `capacity`, which
        makes this the fast dropless path on one device. Under an expert-parallel mesh the per-block weight
        gather would become an all-gather of every expert, so there `__call__` runs the same block-padded
        GEMM on each shard's own experts after `ragged`'s exchange (whose `capacity_factor` then applies).
        """
        cfg = self.cfg
        n_tokens, top_k = topk_idx_NK.shape
        n_experts = cfg.n_routed_experts
        n_assign = n_tokens * top_k
        block = max(1, min(block, n_assign))
        order_A, sorted_expert_A, token_A, counts_E, rank_A = sort_by_expert(topk_idx_NK, n_experts)
        # The expert owning each block; blocks past the last expert's padding hold only zero rows.
        padded_start_E, _, block_expert_B = block_layout(counts_E, n_assign, block)
        n_blocks = block_expert_B.shape[0]
        row_A = padded_start_E[sorted_expert_A] + rank_A

        gate_EDF, up_EDF, down_EFD = self._weights()
        x_ND = x_ND.astype(gate_EDF.dtype)
        rows_BbD = (jnp.zeros((n_blocks * block, x_ND.shape[1]), x_ND.dtype).at[row_A].set(x_ND[token_A])
                    .reshape(n_blocks, block, -1))
        h_BbF = (jax.nn.silu(tag(_per_expert_matmul(self.dot_general, rows_BbD, gate_EDF[block_expert_B]), EXPERT_GATE))
                 * tag(_per_expert_matmul(self.dot_general, rows_BbD, up_EDF[block_expert_B]), EXPERT_UP))
        y_RD = _per_expert_matmul(self.dot_general, h_BbF, down_EFD[block_expert_B]).reshape(n_blocks * block, -1)
        weight_A = topk_weight_NK.reshape(-1)[order_A]
        out_ND = jnp.zeros(x_ND.shape, jnp.float32).at[token_A].add(y_RD[row_A].astype(jnp.float32) * weight_A[:, None])
        return out_ND.astype(x_ND.dtype)

    def ragged(self, x_ND: jax.Array, topk_idx_NK: jax.Array, topk_weight_NK: jax.Array,
               impl: Implementation) -> tuple[jax.Array, jax.Array]:
        """Dropless grouped GEMMs (moe_ragged.py: tokamax's grouped-matmul kernel, padded row blocks, or
        `jax.lax.ragged_dot`, as `impl.grouped_gemm` says); expert-parallel where `impl.exchange` is.

        Expert-parallel, the tokens stay split over the batch axes and each device runs only its own experts
        (`ragged_experts_ep`: all-to-all there and back, expert width split over `tensor`). There
        `capacity_factor` bounds the rows each token shard sends each expert shard (dropless buffers are
        sized for the worst case); the dropped fraction is returned. A token count the batch axes do not
        divide (e.g. one sequence while generating) runs unsplit instead (choose() says so).
        """
        weights = self._weights()
        if impl.expert_parallel:
            plan = active_plan()
            tensor_axes = plan.rules["expert_mlp"]
            tensor_axis = tensor_axes[0] if tensor_axes and plan.mesh.shape[tensor_axes[0]] > 1 else None
            out_ND, _, dropped = ragged_experts_ep(
                x_ND, topk_idx_NK, topk_weight_NK, *weights, mesh=plan.mesh, expert_axis=plan.rules["experts"][0],
                token_axes=tuple(plan.rules["batch"]), tensor_axis=tensor_axis,
                capacity_factor=self.cfg.capacity_factor, transport=impl.exchange, grouped_gemm=impl.grouped_gemm,
                gemm_kernel=impl.gemm_kernel)
            return out_ND, dropped.astype(jnp.float32) / topk_idx_NK.size
        out_ND = ragged_experts(x_ND, topk_idx_NK, topk_weight_NK, *weights, impl.grouped_gemm, impl.gemm_kernel)
        return out_ND, jnp.float32(0.0)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int:
    """Slots per expert: all tokens when dropless (a token picks an expert at most once), else factor * fair share."""
    if capacity_factor is None:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


class MoE(nnx.Module):
    """Routed experts + shared experts on the post-attention-normed hidden state."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general):
        self.cfg = cfg
        self.gate = Router(cfg, rngs)
        self.experts = RoutedExperts(cfg, rngs, dot_general)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, cfg, rngs,
                                   dot_general, hidden_axis="expert_mlp") if cfg.n_shared_experts else None)

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, MoEAux]:
        batch, seq_len, dim = x_BTD.shape
        x_ND = x_BTD.reshape(-1, dim)
        with jax.named_scope("moe_router"):
            topk_idx_NK, topk_weight_NK, scores_NE = self.gate(x_ND)
        with jax.named_scope("moe_routed_experts"):  # dispatch, expert GEMMs, combine
            routed_ND, dropped = self.experts(x_ND, topk_idx_NK, topk_weight_NK)
        if self.shared_experts is not None:
            with jax.named_scope("moe_shared_experts"):
                routed_ND = routed_ND + self.shared_experts(x_ND)
        out_ND = routed_ND
        k = self.cfg.num_experts_per_tok
        seq_loss, batch_loss = balance_losses(scores_NE.reshape(batch, seq_len, -1),
                                              topk_idx_NK.reshape(batch, seq_len, k), self.cfg.n_routed_experts)
        counts_E = jnp.bincount(topk_idx_NK.reshape(-1), length=self.cfg.n_routed_experts).astype(jnp.float32)
        aux = MoEAux(expert_counts=counts_E, seq_balance_loss=seq_loss, batch_balance_loss=batch_loss,
                     dropped_fraction=dropped, topk_idx=topk_idx_NK, topk_weight=topk_weight_NK)
        return out_ND.reshape(batch, seq_len, dim), aux
