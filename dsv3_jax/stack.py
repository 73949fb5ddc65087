"""Decoder layers as stacks: parameters with a leading layer axis, applied with `jax.lax.scan`, optionally
rematerialised (docs/design.md, "Scanned layers, rematerialisation and gradient accumulation").

A stack is one `DecoderLayer` module whose every variable carries a leading [L] axis (built with `nnx.vmap`
over split RNG streams). Applying it splits the module into (graphdef, state) and scans a pure body over the
state's leading axis: the body merges one layer's slice back into a module and calls it. The traced program
holds one layer body whatever the depth, so tracing and compile time stay flat in `num_hidden_layers`.

Rematerialisation wraps the same body (scanned, unrolled or an MTP block) in `jax.checkpoint` with a policy
over the names (dsv3_jax/remat_names.py) that mla.py, moe.py, moe_ragged.py and layers.py give intermediates:

* `none`: no checkpoint; autodiff keeps every intermediate of every layer.
* `full`: keeps nothing inside a layer; the backward pass recomputes each layer's forward from its input
  (the scan carry, [B, T, D] per layer).
* `minimal`: keeps the outputs of the projections that are expensive to recompute and linear in tokens to
  store (`MINIMAL_SAVED`: the MLA latents and up-projections, the attention output that feeds o_proj, the
  gate/up GEMM outputs of routed, shared and dense experts), and recomputes the rest: norms, RoPE, the
  [B, H, T, S] attention scores and probabilities, routing, dispatch buffers and the down projections.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from dsv3_jax.block import DecoderLayer
from dsv3_jax.config import ModelConfig
from dsv3_jax.kv_cache import LayerEntries
from dsv3_jax.layers import DotGeneral
from dsv3_jax.remat_names import MINIMAL_SAVED

# model.remat -> jax.checkpoint policy; None means no checkpoint at all. Add a policy here and in
# config.REMAT_POLICIES (and teach plan.activation_breakdown what it keeps).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names(*MINIMAL_SAVED),
}


def stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs, count: int, use_moe: bool,
                   dot_general: DotGeneral) -> DecoderLayer:
    """`count` independently initialised DecoderLayers as one module whose variables are [count, ...]."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})  # axis 0: layers
    def create(layer_rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, layer_rngs, use_moe=use_moe, dot_general=dot_general)

    return create(rngs)


def rematerialised(body: Callable, remat: str, *, in_scan: bool) -> Callable:
    """`body` under `jax.checkpoint` with the `model.remat` policy (unchanged for `none`).

    prevent_cse is only needed outside a scan (XLA cannot CSE the recomputation across loop iterations)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    policy = REMAT_POLICIES[remat]
    if remat == "none":
        return body
    return jax.checkpoint(body, policy=policy, prevent_cse=not in_scan)


def call_layer(layer: nnx.Module, remat: str, *args: Any) -> Any:
    """`layer(*args)` for one (unstacked) module, rematerialised by `remat` (the unrolled layout, MTP blocks)."""
    graphdef, state = nnx.split(layer)

    def body(state: Any, *args: Any) -> Any:
        return nnx.merge(graphdef, state)(*args)
    return rematerialised(body, remat, in_scan=False)(state, *args)


def scan_layers(stack: DecoderLayer, h_BTD: jax.Array, positions_BT: jax.Array, remat: str,
                keep_hidden: bool = False) -> tuple[jax.Array, Any, jax.Array | None]:
    """Apply a stack's layers in order: (output [B, T, D], per-layer MoEAux stacked on [L] (None for dense
    stacks), residual stream after each layer [L, B, T, D] when `keep_hidden`)."""
    graphdef, state = nnx.split(stack)

    def body(h_BTD: jax.Array, layer_state: Any) -> tuple[jax.Array, tuple[Any, jax.Array | None]]:
        h_BTD, aux = nnx.merge(graphdef, layer_state)(h_BTD, positions_BT)
        return h_BTD, (aux, h_BTD if keep_hidden else None)

    h_BTD, (aux, hidden_LBTD) = jax.lax.scan(rematerialised(body, remat, in_scan=True), h_BTD, state)
    return h_BTD, aux, hidden_LBTD


def _entries_at(entries: LayerEntries, index: jax.Array) -> LayerEntries:
    return type(entries)(*(jax.lax.dynamic_index_in_dim(a, index, keepdims=False) for a in entries))


def _entries_with(entries: LayerEntries, index: jax.Array, layer: LayerEntries) -> LayerEntries:
    return type(entries)(*(jax.lax.dynamic_update_index_in_dim(a, x, index, 0) for a, x in zip(entries, layer)))


def scan_cached(stack: DecoderLayer, method: str, h_BTD: jax.Array, entries: LayerEntries, first: int,
                *args: Any) -> tuple[jax.Array, LayerEntries]:
    """`DecoderLayer.prefill` / `.decode` (by `method`) over a stack whose layers own cache rows
    first .. first + L - 1 of the all-layer cache `entries` [L_all, B, S, ...]. The cache rides in the scan
    carry and each layer updates its own row in place, so no per-stack copy of the cache is made."""
    graphdef, state = nnx.split(stack)
    count = jax.tree.leaves(state)[0].shape[0]

    def body(carry: tuple[jax.Array, LayerEntries], xs: tuple[Any, jax.Array]):
        h_BTD, entries = carry
        layer_state, index = xs
        layer = nnx.merge(graphdef, layer_state)
        h_BTD, new = getattr(layer, method)(h_BTD, *args, _entries_at(entries, index))
        return (h_BTD, _entries_with(entries, index, new)), None

    indices = jax.numpy.arange(first, first + count, dtype=jax.numpy.int32)
    (h_BTD, entries), _ = jax.lax.scan(body, (h_BTD, entries), (state, indices))
    return h_BTD, entries
