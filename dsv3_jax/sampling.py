"""Next-token distributions and sampling: greedy, temperature, top-k, top-p (nucleus).

The settings are a frozen (hashable) dataclass passed to jit as a static argument: each combination compiles
once, and greedy decoding compiles to a plain argmax. `probabilities` gives the distribution actually sampled
from, which speculative decoding needs for both the draft and the target; greedy is the one-hot of the argmax,
so the speculative-sampling rule reduces to exact-match acceptance.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """Impossible sampling settings."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters (applied in the order
    temperature, top-k, top-p, as HF does)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "Sampling":
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        return self


def filtered_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled logits with everything outside top-k / the top-p nucleus set to -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    vocab = logits_BV.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)  # ties at the k-th value all stay
    if sampling.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the mass strictly before it is < top_p: the smallest set reaching top_p.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        n_keep_B = jnp.sum(before_BV < sampling.top_p, axis=-1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
        logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
    return logits_BV


def probabilities(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """The distribution [B, V] (float32) that `sample` draws from."""
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filtered_logits(logits_BV, sampling), axis=-1)


def sample(key: jax.Array, logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row [B] (int32)."""
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_BV, sampling), axis=-1).astype(jnp.int32)


def sample_from_probs(key: jax.Array, probs_BV: jax.Array, greedy: bool) -> jax.Array:
    """A token per row from explicit probabilities (argmax when greedy, so one-hot inputs stay exact)."""
    if greedy:
        return jnp.argmax(probs_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def speculative_accept(key: jax.Array, draft_B: jax.Array, q_BV: jax.Array, p_BV: jax.Array,
                       greedy: bool) -> tuple[jax.Array, jax.Array]:
    """The speculative-sampling rule for one drafted token per row: accept d ~ q with probability
    min(1, p(d)/q(d)); on rejection draw from the residual max(0, p - q) (renormalised). The emitted token is
    then distributed exactly as p. Returns (accepted [B] bool, replacement token [B] for rejected rows)."""
    accept_key, residual_key = jax.random.split(key)
    rows = jnp.arange(draft_B.shape[0])
    p_d, q_d = p_BV[rows, draft_B], q_BV[rows, draft_B]
    if greedy:  # one-hot p and q: accept iff the target's argmax is the draft
        accepted = p_d > 0
    else:
        uniform_B = jax.random.uniform(accept_key, draft_B.shape)
        accepted = uniform_B * q_d < p_d  # u < p/q without dividing by a possibly tiny q
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    mass_B1 = residual_BV.sum(-1, keepdims=True)
    # Zero residual mass means p == q where it matters, and then the draft was accepted; fall back to p anyway.
    residual_BV = jnp.where(mass_B1 > 0, residual_BV / jnp.where(mass_B1 > 0, mass_B1, 1.0), p_BV)
    return accepted, sample_from_probs(residual_key, residual_BV, greedy)
