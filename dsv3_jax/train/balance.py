"""Load-balance bookkeeping: the aux-loss-free bias update and MaxVio (definitions: docs/semantics.md §10.3-§10.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
    """b_i += rate * sign(mean(c) - c_i): overloaded experts become less attractive (LFB Algorithm 1).

    Vectorised over leading axes: [L, E] biases and counts update every layer of a stack in one op.
    `counts_E` must be the load over the whole global batch (all microbatches of a step); under jit with GSPMD
    a sum over a sharded batch already is global.
    """
    mean = jnp.mean(counts_E, axis=-1, keepdims=True)
    return bias_E + rate * jnp.sign(mean - counts_E).astype(bias_E.dtype)


def max_violation(counts_E: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load over the last axis; 0 for perfect balance."""
    mean = jnp.mean(counts_E, axis=-1)
    return (jnp.max(counts_E, axis=-1) - mean) / jnp.maximum(mean, 1e-9)
