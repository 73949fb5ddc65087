"""Decode caches for MLA: the absorbed latent cache and, for comparison, a cache of expanded per-head K/V.

Layout: one preallocated buffer per cached quantity, stacked over layers ([L, B, S, ...]), plus the number of
tokens each row holds. Rows are right-padded: a row's token at position p lives in slot p, so RoPE positions,
cache slots and the causal mask agree per row. Slots at or past a row's length may hold junk (prompt padding,
rejected speculative drafts); every query at position p writes slot p before it attends to slots <= p, so junk
is always overwritten before anything can see it, and rolling back a row is just lowering its length.

Shape suffixes: L layers, B batch, S cache slots, T new tokens, H heads, C latent, R rope dim, N nope dim,
V value dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from dsv3_jax.config import ModelConfig

CACHE_KINDS = ("latent", "expanded")


class LatentEntries(NamedTuple):
    """Absorbed MLA (docs/semantics.md §3.7): the normalised latent and the rotated shared rope key per token."""

    c_kv: jax.Array  # [(L,) B, S, C]
    k_pe: jax.Array  # [(L,) B, S, R]


class ExpandedEntries(NamedTuple):
    """What a naive MHA-style cache holds: per-head keys and values up-projected from the latent (plus the
    rope key, which MLA shares across heads)."""

    k_nope: jax.Array  # [(L,) B, S, H, N]
    v: jax.Array  # [(L,) B, S, H, V]
    k_pe: jax.Array  # [(L,) B, S, R]


LayerEntries = LatentEntries | ExpandedEntries


@struct.dataclass
class KVCache:
    """Per-layer entries stacked over layers, and how many tokens each row holds (= its next position)."""

    entries: LayerEntries
    lengths: jax.Array  # [B] int32

    def layer(self, index: int) -> LayerEntries:
        """Layer `index`'s entries ([B, S, ...] each)."""
        return type(self.entries)(*(a[index] for a in self.entries))

    def with_layer(self, index: int, entries: LayerEntries) -> "KVCache":
        """The cache with layer `index` replaced (an in-place update when the cache buffer is donated)."""
        stacked = type(self.entries)(*(a.at[index].set(e) for a, e in zip(self.entries, entries)))
        return self.replace(entries=stacked)


def entry_shapes(cfg: ModelConfig, kind: str) -> tuple[tuple[int, ...], ...]:
    """Per-token shape of each cached array of one layer, in the order of the entry tuple."""
    if kind == "latent":
        return (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)
    if kind == "expanded":
        heads = cfg.num_attention_heads
        return (heads, cfg.qk_nope_head_dim), (heads, cfg.v_head_dim), (cfg.qk_rope_head_dim,)
    raise ValueError(f"cache kind must be one of {CACHE_KINDS}, got {kind!r}")


def init_cache(cfg: ModelConfig, n_layers: int, batch: int, capacity: int, kind: str = "latent",
               dtype: jnp.dtype | str | None = None) -> KVCache:
    """An empty cache of `capacity` slots per row (zeros; lengths 0). dtype defaults to the compute dtype."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    arrays = [jnp.zeros((n_layers, batch, capacity, *shape), dtype) for shape in entry_shapes(cfg, kind)]
    entries = LatentEntries(*arrays) if kind == "latent" else ExpandedEntries(*arrays)
    return KVCache(entries=entries, lengths=jnp.zeros((batch,), jnp.int32))


def write_entries(entries: LayerEntries, new: LayerEntries, positions_BT: jax.Array) -> LayerEntries:
    """Scatter the T new tokens' entries of one layer into slot = position, per row. Positions past the end
    are dropped (a finished row that keeps stepping must not clobber the last slot)."""
    rows_B1 = jnp.arange(positions_BT.shape[0])[:, None]
    return type(entries)(*(buf.at[rows_B1, positions_BT].set(val.astype(buf.dtype), mode="drop")
                           for buf, val in zip(entries, new)))


def visible_mask(positions_BT: jax.Array, capacity: int) -> jax.Array:
    """[B, T, S]: slot s is visible to the query at position p iff s <= p (causal, per row)."""
    return jnp.arange(capacity)[None, None, :] <= positions_BT[:, :, None]


def cache_numbers_per_token(cfg: ModelConfig, kind: str = "latent") -> int:
    """Numbers cached per token and layer (576 latent / 32,832 expanded at V3 dims)."""
    total = 0
    for shape in entry_shapes(cfg, kind):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def latent_cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | str = "bfloat16") -> int:
    """Bytes of absorbed-MLA cache per token over the main layers: (kv_lora_rank + qk_rope_head_dim) x
    num_hidden_layers x dtype bytes (70,272 for V3 in bf16). Pure arithmetic: nothing is allocated."""
    return cache_numbers_per_token(cfg, "latent") * cfg.num_hidden_layers * jnp.dtype(dtype).itemsize


def expanded_cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | str = "bfloat16") -> int:
    """Bytes per token over the main layers for a cache of expanded per-head K/V (heads x (nope + value) +
    the shared rope key)."""
    return cache_numbers_per_token(cfg, "expanded") * cfg.num_hidden_layers * jnp.dtype(dtype).itemsize
