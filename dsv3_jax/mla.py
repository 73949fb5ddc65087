"""Multi-head Latent Attention (docs/semantics.md §3): low-rank queries and keys/values with a
decoupled rope key.

Shape suffixes: B batch, T query positions, S key positions, H heads, N nope dim, R rope dim, V value dim,
C kv latent (kv_lora_rank), D hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import causal_attention
from dsv3_jax.kv_cache import ExpandedEntries, LatentEntries, LayerEntries, visible_mask, write_entries
from dsv3_jax.layers import DotGeneral, Linear, RMSNorm
from dsv3_jax.remat_names import MLA_ATTENTION_OUT, MLA_KV, MLA_KV_LATENT, MLA_Q, MLA_Q_LATENT, tag
from dsv3_jax.rope import apply_rope, rope_cos_sin, softmax_scale
from dsv3_jax.partitioning import constrain, implementation

HEADS_AXES = ("batch", "length", "heads", None)  # [B, T, H, dim] under a mesh: heads on tensor


class MLA(nnx.Module):
    """MLA with HF/official weight structure; `__call__` is the full-sequence causal path, `prefill`/`decode`
    the cached paths (absorbed over a latent cache, or expanded over per-head K/V, by the cache's type)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dot_general: DotGeneral = jax.lax.dot_general):
        self.cfg = cfg
        heads = cfg.num_attention_heads
        if cfg.q_lora_rank is not None:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, cfg, rngs, ("embed", "q_lora"), dot_general)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg)
            self.q_b_proj = Linear(cfg.q_lora_rank, heads * cfg.qk_head_dim, cfg, rngs, ("q_lora", "heads"),
                                   dot_general)
        else:
            self.q_proj = Linear(cfg.hidden_size, heads * cfg.qk_head_dim, cfg, rngs, ("embed", "heads"), dot_general)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_cache_dim, cfg, rngs, ("embed", "kv_lora"),
                                         dot_general)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg, rngs,
                                ("kv_lora", "heads"), dot_general)
        self.o_proj = Linear(heads * cfg.v_head_dim, cfg.hidden_size, cfg, rngs, ("heads", "embed"), dot_general)

    def queries(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q_nope [B,T,H,N], rotated q_pe [B,T,H,R]); each head's 192 dims are nope first, then rope."""
        cfg = self.cfg
        if cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(tag(self.q_a_proj(x_BTD), MLA_Q_LATENT)))
        else:
            q = self.q_proj(x_BTD)
        q_BTHK = tag(q, MLA_Q).reshape(*x_BTD.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope_BTHN, q_pe_BTHR = jnp.split(constrain(q_BTHK, *HEADS_AXES), [cfg.qk_nope_head_dim], axis=-1)
        return q_nope_BTHN, apply_rope(q_pe_BTHR, cos, sin)

    def latent(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """What the decode cache holds per token: normalised c_kv [B,T,C] and rotated shared k_pe [B,T,R]."""
        kv_a = tag(self.kv_a_proj_with_mqa(x_BTD), MLA_KV_LATENT)
        c_kv_BTC, k_pe_BTR = jnp.split(kv_a, [self.cfg.kv_lora_rank], axis=-1)
        return self.kv_a_layernorm(c_kv_BTC), apply_rope(k_pe_BTR, cos, sin)

    def expand_kv(self, c_kv_BSC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Up-project the latent to per-head keys [B,S,H,N] and values [B,S,H,V] (rows: k then v per head)."""
        cfg = self.cfg
        kv = tag(self.kv_b_proj(c_kv_BSC), MLA_KV).reshape(*c_kv_BSC.shape[:2], cfg.num_attention_heads,
                                              cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope_BSHN, v_BSHV = jnp.split(constrain(kv, *HEADS_AXES), [cfg.qk_nope_head_dim], axis=-1)
        return k_nope_BSHN, v_BSHV

    def absorbed_weights(self) -> tuple[jax.Array, jax.Array]:
        """kv_b_proj split per head into W_UK [C,H,N] (folded into the query) and W_UV [C,H,V] (applied after
        attention over the latent). Read as plain weights: like the official absorb path, no FP8 GEMM here."""
        cfg = self.cfg
        kernel = self.kv_b_proj.kernel[...].astype(self.kv_b_proj.compute_dtype)
        kernel_CHK = kernel.reshape(cfg.kv_lora_rank, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        w_uk_CHN, w_uv_CHV = jnp.split(kernel_CHK, [cfg.qk_nope_head_dim], axis=-1)
        return w_uk_CHN, w_uv_CHV

    def _causal(self, x_BTD: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Full-sequence causal attention; also returns (c_kv, k_pe, k_nope, v) so prefill can cache them."""
        with jax.named_scope("mla_projections"):
            cos, sin = rope_cos_sin(positions_BT, self.cfg)
            q_nope_BTHN, q_pe_BTHR = self.queries(x_BTD, cos, sin)
            c_kv_BTC, k_pe_BTR = self.latent(x_BTD, cos, sin)
            k_nope_BTHN, v_BTHV = self.expand_kv(c_kv_BTC)
        with jax.named_scope("mla_attention"):
            impl = implementation(self.cfg)  # xla | chunked | a fused kernel (backend_policy.choose)
            if impl.attention in ("splash", "tokamax"):
                out_BTHV = attend_causal_fused(q_nope_BTHN, q_pe_BTHR, k_nope_BTHN, k_pe_BTR, v_BTHV,
                                               softmax_scale(self.cfg), impl.attention, impl.attention_kernel,
                                               impl.interpret)
            else:
                out_BTHV = attend_causal(q_nope_BTHN, q_pe_BTHR, k_nope_BTHN, k_pe_BTR, v_BTHV,
                                         softmax_scale(self.cfg), impl.attention_chunk)
            out_BTHV = constrain(out_BTHV, *HEADS_AXES)
        with jax.named_scope("mla_out_proj"):
            out_BTD = self.o_proj(tag(out_BTHV.reshape(*x_BTD.shape[:2], -1), MLA_ATTENTION_OUT))
        return out_BTD, (c_kv_BTC, k_pe_BTR, k_nope_BTHN, v_BTHV)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        return self._causal(x_BTD, positions_BT)[0]

    def prefill(self, x_BTD: jax.Array, entries: LayerEntries) -> tuple[jax.Array, LayerEntries]:
        """Causal attention over a (right-padded) prompt that starts at position 0, writing its cache entries
        to slots 0..T-1. Prefill has T queries, so the expanded form is the cheaper one to compute with."""
        batch, seq_len = x_BTD.shape[:2]
        positions_BT = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        out_BTD, (c_kv_BTC, k_pe_BTR, k_nope_BTHN, v_BTHV) = self._causal(x_BTD, positions_BT)
        new = (LatentEntries(c_kv_BTC, k_pe_BTR) if isinstance(entries, LatentEntries)
               else ExpandedEntries(k_nope_BTHN, v_BTHV, k_pe_BTR))
        return out_BTD, write_entries(entries, new, positions_BT)

    def decode(self, x_BTD: jax.Array, positions_BT: jax.Array,
               entries: LayerEntries) -> tuple[jax.Array, LayerEntries]:
        """T new tokens per row at per-row `positions_BT` against the cache; the cache type picks the path."""
        if isinstance(entries, LatentEntries):
            return self.decode_absorbed(x_BTD, positions_BT, entries)
        return self.decode_expanded(x_BTD, positions_BT, entries)

    def decode_absorbed(self, x_BTD: jax.Array, positions_BT: jax.Array,
                        entries: LatentEntries) -> tuple[jax.Array, LatentEntries]:
        """Attention over the latent cache only: W_UK is folded into the query (scores against c_kv directly)
        and W_UV applied to the attention-weighted latent, so no per-head K/V is ever materialised."""
        cos, sin = rope_cos_sin(positions_BT, self.cfg)
        q_nope_BTHN, q_pe_BTHR = self.queries(x_BTD, cos, sin)
        entries = write_entries(entries, LatentEntries(*self.latent(x_BTD, cos, sin)), positions_BT)
        w_uk_CHN, w_uv_CHV = self.absorbed_weights()
        q_lat_BTHC = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_uk_CHN)
        mask_BTS = visible_mask(positions_BT, entries.c_kv.shape[1])
        o_lat_BTHC = attend_latent(q_lat_BTHC, q_pe_BTHR, entries.c_kv, entries.k_pe, mask_BTS,
                                   softmax_scale(self.cfg))
        out_BTHV = constrain(jnp.einsum("bthc,chv->bthv", o_lat_BTHC, w_uv_CHV), *HEADS_AXES)
        return self.o_proj(out_BTHV.reshape(*x_BTD.shape[:2], -1)), entries

    def decode_expanded(self, x_BTD: jax.Array, positions_BT: jax.Array,
                        entries: ExpandedEntries) -> tuple[jax.Array, ExpandedEntries]:
        """The naive cached path: up-project each new latent once, cache per-head K/V, attend as in MHA."""
        cos, sin = rope_cos_sin(positions_BT, self.cfg)
        q_nope_BTHN, q_pe_BTHR = self.queries(x_BTD, cos, sin)
        c_kv_BTC, k_pe_BTR = self.latent(x_BTD, cos, sin)
        entries = write_entries(entries, ExpandedEntries(*self.expand_kv(c_kv_BTC), k_pe_BTR), positions_BT)
        mask_B1TS = visible_mask(positions_BT, entries.k_pe.shape[1])[:, None]
        out_BTHV = attend(q_nope_BTHN, q_pe_BTHR, entries.k_nope, entries.k_pe, entries.v, mask_B1TS,
                          softmax_scale(self.cfg))
        out_BTHV = constrain(out_BTHV, *HEADS_AXES)
        return self.o_proj(out_BTHV.reshape(*x_BTD.shape[:2], -1)), entries

def attend(q_nope_BTHN: jax.Array, q_pe_BTHR: jax.Array, k_nope_BSHN: jax.Array, k_pe_BSR: jax.Array,
           v_BSHV: jax.Array, mask_TS: jax.Array, scale: float) -> jax.Array:
    """Softmax attention with the nope and (head-shared) rope score parts summed; scores and softmax in fp32."""
    scores_BHTS = (jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=jnp.float32)
                   + jnp.einsum("bthr,bsr->bhts", q_pe_BTHR, k_pe_BSR, preferred_element_type=jnp.float32))
    scores_BHTS = jnp.where(mask_TS, scores_BHTS * scale, -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHV.dtype)
    return jnp.einsum("bhts,bshv->bthv", probs_BHTS, v_BSHV)


def attend_causal(q_nope_BTHN: jax.Array, q_pe_BTHR: jax.Array, k_nope_BSHN: jax.Array, k_pe_BSR: jax.Array,
                  v_BSHV: jax.Array, scale: float, chunk: int | None = None) -> jax.Array:
    """Causal self-attention (T == S), optionally over query chunks of `chunk` positions.

    Unchunked, the fp32 scores are one [B, H, T, S] tensor (8 GiB per sequence for V3's 128 heads at 4K), and
    autodiff keeps the probabilities for the backward pass. Chunked, a `lax.scan` walks [B, chunk, H, *] query
    slices against all keys under `jax.checkpoint`, so only one [B, H, chunk, S] slice of scores exists at a
    time in either pass (the backward recomputes each slice's scores, one extra QK^T). Each query row's softmax
    is the same computation either way; a last partial chunk is padded with queries whose rows are dropped.
    """
    seq_len = q_nope_BTHN.shape[1]
    if chunk is None or chunk >= seq_len:
        causal_TS = jnp.tril(jnp.ones((seq_len, seq_len), bool))
        return attend(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, causal_TS, scale)
    n_chunks = -(-seq_len // chunk)
    pad = n_chunks * chunk - seq_len

    def chunked(x_BTHK: jax.Array) -> jax.Array:  # [B, T, H, K] -> [n, B, chunk, H, K]
        x_BTHK = jnp.pad(x_BTHK, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(x_BTHK.reshape(x_BTHK.shape[0], n_chunks, chunk, *x_BTHK.shape[2:]), 1, 0)

    key_positions_S = jnp.arange(seq_len)

    @jax.checkpoint  # keep only the chunk's inputs; its scores are recomputed in the backward pass
    def one_chunk(carry: None, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        q_nope_BCHN, q_pe_BCHR, start = xs
        mask_CS = (start + jnp.arange(chunk))[:, None] >= key_positions_S[None, :]
        return carry, attend(q_nope_BCHN, q_pe_BCHR, k_nope_BSHN, k_pe_BSR, v_BSHV, mask_CS, scale)

    starts_n = jnp.arange(n_chunks) * chunk
    _, out_nBCHV = jax.lax.scan(one_chunk, None, (chunked(q_nope_BTHN), chunked(q_pe_BTHR), starts_n))
    out_BTHV = jnp.moveaxis(out_nBCHV, 0, 1).reshape(out_nBCHV.shape[1], n_chunks * chunk, *out_nBCHV.shape[3:])
    return out_BTHV[:, :seq_len]


def attend_causal_fused(q_nope_BTHN: jax.Array, q_pe_BTHR: jax.Array, k_nope_BSHN: jax.Array, k_pe_BSR: jax.Array,
                        v_BSHV: jax.Array, scale: float, kernel: str, kernel_implementation: str | None = None,
                        interpret: bool = False) -> jax.Array:
    """`attend_causal` through a fused kernel (dsv3_jax/kernels.py): each head's query is [nope, rope] and its
    key [nope, the shared rope key], 192 dims for V3 against values of 128, as the kernels take them unpadded;
    `scale` (softmax_scale: 1/sqrt(192) times YaRN's mscale^2) is the kernel's softmax scale."""
    heads = q_nope_BTHN.shape[2]
    q_BTHK = jnp.concatenate([q_nope_BTHN, q_pe_BTHR], axis=-1)
    k_pe_BSHR = jnp.broadcast_to(k_pe_BSR[:, :, None, :], (*k_pe_BSR.shape[:2], heads, k_pe_BSR.shape[-1]))
    k_BSHK = jnp.concatenate([k_nope_BSHN, k_pe_BSHR.astype(k_nope_BSHN.dtype)], axis=-1)
    return causal_attention(q_BTHK, k_BSHK, v_BSHV, scale, kernel, kernel_implementation, interpret)


def attend_latent(q_lat_BTHC: jax.Array, q_pe_BTHR: jax.Array, c_kv_BSC: jax.Array, k_pe_BSR: jax.Array,
                  mask_BTS: jax.Array, scale: float) -> jax.Array:
    """Absorbed attention: scores q_lat.c_kv + q_pe.k_pe (fp32), output sum_s p * c_kv [B,T,H,C] (the latent
    that W_UV turns into per-head values). Every head reads the same [S, C + R] cache rows."""
    scores_BHTS = (jnp.einsum("bthc,bsc->bhts", q_lat_BTHC, c_kv_BSC, preferred_element_type=jnp.float32)
                   + jnp.einsum("bthr,bsr->bhts", q_pe_BTHR, k_pe_BSR, preferred_element_type=jnp.float32))
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * scale, -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(c_kv_BSC.dtype)
    return jnp.einsum("bhts,bsc->bthc", probs_BHTS, c_kv_BSC)
