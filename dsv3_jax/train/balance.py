"""Load-balance bookkeeping: the aux-loss-free bias update and MaxVio (definitions: docs/semantics.md §10.3-§10.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_bias(bias_E: jax.Array, counts_E: jax.Array, rate: float) -> jax.Array:
    """b_i += rate * sign(mean(c) - c_i): overloaded experts become less attractive (LFB Algorithm 1).

    `counts_E` must be the load over the whole global batch; under jit with GSPMD a sum over a sharded batch
    already is global.
    """
    return bias_E + rate * jnp.sign(jnp.mean(counts_E) - counts_E).astype(bias_E.dtype)


def max_violation(counts_E: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load; 0 for perfect balance."""
    mean = jnp.mean(counts_E)
    return (jnp.max(counts_E) - mean) / jnp.maximum(mean, 1e-9)
