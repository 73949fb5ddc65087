"""The LM head's cross-entropy without whole logits: hidden states and the head matrix in, mean CE out.

At DeepSeek-V3's vocabulary (129,280) the fp32 logits of one 4K sequence are 2 GiB, and autodiff keeps them and
their gradient alive for every prediction head (main + MTP). `chunked_cross_entropy` computes the logits one
chunk of positions at a time, keeps only each position's log-sum-exp, and in its own backward pass recomputes
each chunk's logits to form (softmax - onehot) and the two GEMMs' gradients: one [B, chunk, V] fp32 slice lives
at a time, for the price of the head GEMM once more. The numbers are the XLA path's (model.DeepSeekV3.head,
then optax's integer-label CE): the GEMM runs in the compute dtype, the softmax in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden_HBTD: jax.Array, kernel_DV: jax.Array, targets_HBT: jax.Array, chunk: int,
                          compute_dtype: jnp.dtype) -> jax.Array:
    """Per head h, the mean over [B, T] of -log softmax(hidden[h] @ kernel)[target]: [H] fp32.

    The heads (the main head and each MTP depth, all scoring the same positions) run as one scan over
    H x T/chunk chunks, so the head matrix's fp32 gradient is accumulated once, not once per head."""
    n_heads, batch, seq_len = targets_HBT.shape
    n_chunks = -(-seq_len // chunk)
    pad = n_chunks * chunk - seq_len
    valid_HBT = jnp.ones(targets_HBT.shape, jnp.float32)
    if pad:  # padded positions score nothing and get no gradient
        hidden_HBTD = jnp.pad(hidden_HBTD, ((0, 0), (0, 0), (0, pad), (0, 0)))
        targets_HBT = jnp.pad(targets_HBT, ((0, 0), (0, 0), (0, pad)))
        valid_HBT = jnp.pad(valid_HBT, ((0, 0), (0, 0), (0, pad)))
    totals_H = _ce_sums(hidden_HBTD, kernel_DV, targets_HBT, valid_HBT, chunk, jnp.dtype(compute_dtype))
    return totals_H / (batch * seq_len)


def _chunks(x_HBT: jax.Array, chunk: int) -> jax.Array:
    """[H, B, T, ...] -> [H T/chunk, B, chunk, ...]: the scan axis first, the batch (sharded) axis kept whole."""
    n_heads, batch, seq_len = x_HBT.shape[:3]
    x = x_HBT.reshape(n_heads, batch, seq_len // chunk, chunk, *x_HBT.shape[3:])
    return jnp.moveaxis(x, 2, 1).reshape(n_heads * (seq_len // chunk), batch, chunk, *x_HBT.shape[3:])


def _unchunk(x_NBC: jax.Array, n_heads: int) -> jax.Array:
    """_chunks' inverse: [H T/chunk, B, chunk, ...] -> [H, B, T, ...]."""
    n, batch, chunk = x_NBC.shape[:3]
    x = x_NBC.reshape(n_heads, n // n_heads, batch, chunk, *x_NBC.shape[3:])
    return jnp.moveaxis(x, 1, 2).reshape(n_heads, batch, n // n_heads * chunk, *x_NBC.shape[3:])


def _logits(hidden_BCD: jax.Array, kernel_DV: jax.Array, compute_dtype: jnp.dtype) -> jax.Array:
    """One chunk's fp32 logits, the GEMM in the compute dtype (as layers.Linear runs the head)."""
    return jnp.einsum("bcd,dv->bcv", hidden_BCD.astype(compute_dtype),
                      kernel_DV.astype(compute_dtype)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_sums(hidden_HBTD, kernel_DV, targets_HBT, valid_HBT, chunk, compute_dtype):
    return _ce_forward(hidden_HBTD, kernel_DV, targets_HBT, valid_HBT, chunk, compute_dtype)[0]


def _ce_forward(hidden_HBTD, kernel_DV, targets_HBT, valid_HBT, chunk, compute_dtype):
    n_heads = targets_HBT.shape[0]
    head_N = jnp.repeat(jnp.arange(n_heads), targets_HBT.shape[2] // chunk)  # each chunk's head

    def one_chunk(totals_H, xs):
        hidden_BCD, targets_BC, valid_BC, head = xs
        logits_BCV = _logits(hidden_BCD, kernel_DV, compute_dtype)
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
        return totals_H.at[head].add(jnp.sum((lse_BC - target_BC) * valid_BC)), lse_BC

    xs = (_chunks(hidden_HBTD, chunk), _chunks(targets_HBT, chunk), _chunks(valid_HBT, chunk), head_N)
    totals_H, lse_NBC = jax.lax.scan(one_chunk, jnp.zeros((n_heads,), jnp.float32), xs)
    return totals_H, (hidden_HBTD, kernel_DV, targets_HBT, valid_HBT, lse_NBC, head_N)


def _ce_backward(chunk, compute_dtype, residuals, totals_bar_H):
    hidden_HBTD, kernel_DV, targets_HBT, valid_HBT, lse_NBC, head_N = residuals
    vocab = kernel_DV.shape[1]

    def one_chunk(kernel_bar_DV, xs):
        hidden_BCD, targets_BC, valid_BC, lse_BC, head = xs
        total_bar = totals_bar_H[head]
        logits_BCV = _logits(hidden_BCD, kernel_DV, compute_dtype)
        probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
        onehot_BCV = jax.nn.one_hot(targets_BC, vocab, dtype=jnp.float32)
        # d(sum CE)/d logits, cast to the GEMM's dtype as autodiff of the XLA path casts it
        logits_bar_BCV = ((probs_BCV - onehot_BCV) * (valid_BC * total_bar)[..., None]).astype(compute_dtype)
        hidden_bar_BCD = jnp.einsum("bcv,dv->bcd", logits_bar_BCV, kernel_DV.astype(compute_dtype))
        kernel_bar_DV = kernel_bar_DV + jnp.einsum("bcd,bcv->dv", hidden_BCD.astype(compute_dtype), logits_bar_BCV,
                                                   preferred_element_type=jnp.float32)
        return kernel_bar_DV, hidden_bar_BCD

    xs = (_chunks(hidden_HBTD, chunk), _chunks(targets_HBT, chunk), _chunks(valid_HBT, chunk), lse_NBC, head_N)
    kernel_bar_DV, hidden_bar_NBCD = jax.lax.scan(one_chunk, jnp.zeros(kernel_DV.shape, jnp.float32), xs)
    hidden_bar_HBTD = _unchunk(hidden_bar_NBCD, hidden_HBTD.shape[0])
    return (hidden_bar_HBTD.astype(hidden_HBTD.dtype), kernel_bar_DV.astype(kernel_DV.dtype), None, None)


_ce_sums.defvjp(_ce_forward, _ce_backward)
