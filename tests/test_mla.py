"""MLA against a plain float64 einsum reference built from the same weights (standard MHA over the
reconstructed per-head keys [k_nope ‖ k_pe] and values)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import PRESETS
from dsv3_jax.mla import MLA
from dsv3_jax.rope import rope_attention_factor, rope_inv_freq, softmax_scale
from tolerances import assert_close_f32

TINY = PRESETS["tiny"]


def _rms(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _rope64(x, positions, cfg):
    inv = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling).astype(np.float64)
    ang = positions[..., None] * inv
    cos, sin = np.cos(ang) * rope_attention_factor(cfg.rope_scaling), np.sin(ang) * rope_attention_factor(cfg.rope_scaling)
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def naive_mla(mla: MLA, x, cfg):
    """Textbook multi-head attention with MLA's projections, in float64 numpy."""
    p = {".".join(map(str, k)): np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(mla))}
    b, t, _ = x.shape
    h, n, r, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is not None:
        q = _rms(x @ p["q_a_proj.kernel"], p["q_a_layernorm.weight"], cfg.rms_norm_eps) @ p["q_b_proj.kernel"]
    else:
        q = x @ p["q_proj.kernel"]
    q = q.reshape(b, t, h, n + r)
    pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.float64)
    q = np.concatenate([q[..., :n], _rope64(q[..., n:], pos, cfg)], -1)
    a = x @ p["kv_a_proj_with_mqa.kernel"]
    c_kv = _rms(a[..., :cfg.kv_lora_rank], p["kv_a_layernorm.weight"], cfg.rms_norm_eps)
    k_pe = _rope64(a[..., cfg.kv_lora_rank:], pos, cfg)
    kv = (c_kv @ p["kv_b_proj.kernel"]).reshape(b, t, h, n + v)
    k = np.concatenate([kv[..., :n], np.broadcast_to(k_pe[:, :, None], (b, t, h, r))], -1)
    vals = kv[..., n:]
    s = np.einsum("bthd,bshd->bhts", q, k) * softmax_scale(cfg)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", prob, vals).reshape(b, t, h * v)
    return o @ p["o_proj.kernel"]


@pytest.mark.parametrize("variant", ["q_lora_yarn", "direct_q_no_yarn", "chunked_3", "chunked_4_padded_tail"])
def test_mla_matches_naive_reference(variant):
    cfg = TINY.replace(init_std=0.3) if variant == "q_lora_yarn" else TINY.replace(
        q_lora_rank=None, rope_scaling=None, init_std=0.3)
    if variant.startswith("chunked"):  # 9 positions: 3 chunks of 3, or 2 of 4 and one padded: model.attention_chunk
        cfg = cfg.replace(attention_chunk=int(variant.split("_")[1]))
    mla = MLA(cfg, nnx.Rngs(params=3))
    x = np.random.default_rng(0).standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    out = np.asarray(jax.jit(lambda m, x, p: m(x, p))(mla, jnp.asarray(x), pos))
    # float32 against float64 on the same (float32) inputs and weights. The longest chain of float32 reductions:
    # q_a (32 terms), RMSNorm (24), q_b (24), scores (12), softmax and probs @ V (9), o_proj (16); each rounds
    # by a few ulps of its terms, which are about as large as the outputs: 32 ulps of max |output| (measured 2.4).
    # A wrong rope pairing, scale or mask is off by O(0.1).
    assert_close_f32(out, naive_mla(mla, x.astype(np.float64), cfg), atol_ulps=32)


def test_chunked_attention_gradients_match_unchunked():
    """The chunked scan recomputes each chunk's scores in the backward pass: same gradients (a few ulps)."""
    cfg = TINY.replace(init_std=0.3)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 11, cfg.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))

    def grads(chunk):
        mla = MLA(cfg.replace(attention_chunk=chunk), nnx.Rngs(params=5))
        loss = lambda m, x: jnp.sum(jnp.sin(m(x, pos)))  # noqa: E731
        return nnx.grad(loss, argnums=(0, 1))(mla, x)

    (dm_full, dx_full), (dm_chunk, dx_chunk) = grads(None), grads(4)
    assert_close_f32(dx_chunk, dx_full, atol_ulps=32)
    for (path, a), (_, b) in zip(nnx.to_flat_state(dm_chunk), nnx.to_flat_state(dm_full)):
        assert_close_f32(a[...], b[...], atol_ulps=32, err_msg=str(path))


def test_mla_is_causal():
    cfg = TINY.replace(init_std=0.3)
    mla = MLA(cfg, nnx.Rngs(params=0))
    x = np.random.default_rng(1).standard_normal((1, 8, cfg.hidden_size)).astype(np.float32)
    x2 = x.copy()
    x2[:, 5:] += 3.0  # change the future
    pos = jnp.arange(8)[None]
    a, b = np.asarray(mla(jnp.asarray(x), pos)), np.asarray(mla(jnp.asarray(x2), pos))
    assert_close_f32(b[:, :5], a[:, :5])  # bit-identical in practice (masked keys weigh exactly 0); a few ulps
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_latent_is_the_576_wide_cache_entry():
    cfg = TINY
    mla = MLA(cfg, nnx.Rngs(params=0))
    from dsv3_jax.rope import rope_cos_sin
    cos, sin = rope_cos_sin(jnp.arange(4)[None], cfg)
    c_kv, k_pe = mla.latent(jnp.ones((1, 4, cfg.hidden_size)), cos, sin)
    assert c_kv.shape[-1] + k_pe.shape[-1] == cfg.kv_cache_dim
