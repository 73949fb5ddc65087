"""Interleaved RoPE and YaRN against docs/semantics.md §4 numbers and an independent complex-number reference."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dsv3_jax.config import PRESETS, YarnConfig, get_preset
from dsv3_jax.rope import (apply_rope, rope_attention_factor, rope_cos_sin, rope_inv_freq, softmax_scale,
                           yarn_correction_range)
from tolerances import assert_close_f32

V3 = get_preset("deepseek-v3-671b")


def test_v3_yarn_numbers():
    assert yarn_correction_range(64, 10000.0, V3.rope_scaling) == (10, 23)
    assert softmax_scale(V3) == pytest.approx(0.1352338, abs=5e-8)
    assert rope_attention_factor(V3.rope_scaling) == 1.0


def test_v3_yarn_frequencies_blend():
    # rope_inv_freq blends in float64 and rounds once to float32: within half an ulp of the float64 formula
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    inv = rope_inv_freq(64, 10000.0, V3.rope_scaling)
    assert_close_f32(inv[:11], base[:11], rtol_ulps=1, atol_ulps=0)  # j <= 10 unchanged
    assert_close_f32(inv[23:], base[23:] / 40, rtol_ulps=1, atol_ulps=0)  # j >= 23 interpolated by the factor
    ramp = (np.arange(11, 23) - 10) / 13
    assert_close_f32(inv[11:23], base[11:23] * (1 - ramp) + base[11:23] / 40 * ramp, rtol_ulps=1, atol_ulps=0)


def test_no_yarn_is_plain_rope():
    cfg = PRESETS["small"]
    assert softmax_scale(cfg) == cfg.qk_head_dim ** -0.5
    assert_close_f32(rope_inv_freq(16, 10000.0, None), 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16), rtol_ulps=1,
                     atol_ulps=0)  # float64 rounded once to float32


def test_attention_factor_from_mscales():
    y = YarnConfig(factor=4.0, mscale=0.8, mscale_all_dim=1.0)
    expected = (0.1 * 0.8 * math.log(4) + 1) / (0.1 * math.log(4) + 1)
    assert rope_attention_factor(y) == pytest.approx(expected)
    assert rope_attention_factor(YarnConfig(factor=4.0, mscale=0.0, mscale_all_dim=0.0)) == pytest.approx(
        0.1 * math.log(4) + 1)
    assert rope_attention_factor(YarnConfig(attention_factor=0.5)) == 0.5


def _complex_reference(x, positions, inv_freq):
    """Official model.py semantics: view adjacent pairs as complex numbers and multiply by e^{i pos w}."""
    xc = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2].astype(np.float64)
    rot = np.exp(1j * positions[..., None] * inv_freq.astype(np.float64))
    if x.ndim == 4:
        rot = rot[:, :, None, :]
    y = xc * rot
    out = np.empty(x.shape, np.float64)
    out[..., 0::2], out[..., 1::2] = y.real, y.imag
    return out


@pytest.mark.parametrize("ndim", [3, 4])
def test_interleaved_rotation_matches_complex_reference(ndim):
    cfg = PRESETS["tiny"].replace(qk_rope_head_dim=8)
    rng = np.random.default_rng(0)
    shape = (2, 7, 3, 8) if ndim == 4 else (2, 7, 8)
    x = rng.standard_normal(shape).astype(np.float32)
    positions = np.stack([np.arange(7), np.arange(7) + 100])
    cos, sin = rope_cos_sin(jnp.asarray(positions), cfg)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    inv_freq = rope_inv_freq(8, cfg.rope_theta, cfg.rope_scaling)
    ref = _complex_reference(x, positions, inv_freq)
    # The float32 angle pos * w is off by up to half an ulp of itself (eps/2 * angle radians: ~53 eps at 106),
    # which moves each output by that much times its pair's norm; cos/sin (~1 ulp each), the 2-term rotation and
    # the attention factor add a few ulps more.
    factor = rope_attention_factor(cfg.rope_scaling)
    max_angle = float(positions.max() * inv_freq.max())
    pair_norm = float(np.sqrt(x[..., 0::2] ** 2 + x[..., 1::2] ** 2).max())
    assert_close_f32(out, ref * factor, rtol_ulps=0, atol_ulps=max_angle / 2 + 4, scale=pair_norm * factor)


def test_half_split_rotation_would_differ():
    """Mutation guard: a LLaMA-style half-split rotation is not what the DeepSeek weights expect."""
    cfg = PRESETS["tiny"].replace(rope_scaling=None, qk_rope_head_dim=8)
    x = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32)
    cos, sin = rope_cos_sin(jnp.arange(5)[None], cfg)
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    c, s = np.asarray(cos), np.asarray(sin)
    half = np.concatenate([x[..., :4] * c - x[..., 4:] * s, x[..., 4:] * c + x[..., :4] * s], -1)
    assert np.abs(ours - half).max() > 0.1


def test_relative_position_property():
    """q(m)·k(n) depends only on m - n (without YaRN's attention factor)."""
    cfg = PRESETS["tiny"].replace(rope_scaling=None, qk_rope_head_dim=8)
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 1, 1, 8)).astype(np.float32)

    def score(m, n):
        cq, sq = rope_cos_sin(jnp.array([[m]]), cfg)
        ck, sk = rope_cos_sin(jnp.array([[n]]), cfg)
        return float((apply_rope(jnp.asarray(q), cq, sq) * apply_rope(jnp.asarray(k), ck, sk)).sum())

    # Each float32 angle pos * w (w <= 1) is off by up to half an ulp of itself: the two scores differ by up to
    # eps * (105 + 102 + 5 + 2) / 2 times sum_pairs |q_p||k_p| <= |q||k|, plus ~1 ulp per cos/sin and the 8-term
    # dot's roundings. A position-dependent score is off by O(1).
    assert_close_f32(score(105, 102), score(5, 2), rtol_ulps=0, atol_ulps=(105 + 102 + 5 + 2) / 2 + 16,
                     scale=float(np.linalg.norm(q) * np.linalg.norm(k)))


class RopeVariantsTest(chex.TestCase):
    """The rotation is the same traced under jit and run op by op, for query- and key-shaped inputs."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((2, 7, 3, 8), (2, 7, 8))
    def test_rotation_matches_complex_reference(self, *shape):
        cfg = PRESETS["tiny"].replace(qk_rope_head_dim=8)
        x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
        positions = np.stack([np.arange(7), np.arange(7) + 40])
        cos, sin = self.variant(rope_cos_sin, static_argnums=1)(jnp.asarray(positions), cfg)
        chex.assert_shape((cos, sin), (2, 7, 4))
        out = self.variant(apply_rope)(jnp.asarray(x), cos, sin)
        chex.assert_shape(out, shape)
        chex.assert_type(out, jnp.float32)
        factor = rope_attention_factor(cfg.rope_scaling)
        inv_freq = rope_inv_freq(8, cfg.rope_theta, cfg.rope_scaling)
        ref = _complex_reference(x, positions, inv_freq) * factor
        pair_norm = float(np.sqrt(x[..., 0::2] ** 2 + x[..., 1::2] ** 2).max())
        max_angle = float(positions.max() * inv_freq.max())  # see test_interleaved_rotation_matches_complex_reference
        assert_close_f32(out, ref, rtol_ulps=0, atol_ulps=max_angle / 2 + 4, scale=pair_norm * factor)
