"""Interleaved rotary position embeddings with YaRN frequency scaling (docs/semantics.md §4).

DeepSeek weights rotate *adjacent* channel pairs (x[2j], x[2j+1]); LLaMA's half-split `rotate_half` gives
plausible but wrong outputs on them. We keep the official interleaved output layout: the HF layout is a fixed
permutation of it applied to both q and k, so every attention score is identical.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, YarnConfig


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature m = 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(dim: int, theta: float, yarn: YarnConfig) -> tuple[int, int]:
    """The (low, high) rotary-pair indices between which YaRN ramps from extrapolation to interpolation."""

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    return low, high


def rope_inv_freq(dim: int, theta: float, yarn: YarnConfig | None) -> np.ndarray:
    """Inverse frequencies [dim/2] (float32), YaRN-blended when `yarn` is set."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if yarn is None:
        return inv_freq.astype(np.float32)
    low, high = yarn_correction_range(dim, theta, yarn)
    if low == high:
        high += 0.001  # the reference nudges a degenerate ramp the same way
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    blended = inv_freq * (1.0 - ramp) + (inv_freq / yarn.factor) * ramp
    return blended.astype(np.float32)


def rope_attention_factor(yarn: YarnConfig | None) -> float:
    """Multiplier on cos/sin (HF's `attention_scaling`): 1.0 for DeepSeek-V3's mscale == mscale_all_dim."""
    if yarn is None:
        return 1.0
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_get_mscale(yarn.factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times m^2 with m = yarn_get_mscale(factor, mscale_all_dim) under YaRN (0.1352338 for V3)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        m = yarn_get_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim)
        scale *= m * m
    return scale


def rope_cos_sin(positions: jnp.ndarray, cfg: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [..., rope_dim/2] (float32) for integer positions of any shape."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
    factor = rope_attention_factor(cfg.rope_scaling)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jnp.ndarray, cos_BTR: jnp.ndarray, sin_BTR: jnp.ndarray) -> jnp.ndarray:
    """Rotate adjacent channel pairs. x: [B, T, R] (shared rope key) or [B, T, H, R]; cos/sin: [B, T, R/2]."""
    if x.ndim == 4:  # per-head queries: same angle for every head
        cos_BTR, sin_BTR = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos_BTR - odd * sin_BTR, even * sin_BTR + odd * cos_BTR], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
