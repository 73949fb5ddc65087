"""The MHA baseline of the MLA ablation: a naive per-head float64 oracle, causality, parameter count and
the config plumbing (`model.attention`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import ConfigError, get_preset
from dsv3_jax.mha import MHA, mha_cache_elements_per_token, mha_head_config
from dsv3_jax.model import init_model
from dsv3_jax.rope import rope_inv_freq, softmax_scale
from dsv3_jax.hf_config import to_hf
from tolerances import assert_close_f32

CFG = get_preset("tiny").replace(attention="mha", num_attention_heads=2, v_head_dim=8, init_std=0.2)


def rotate_pairs(x, pos, inv_freq):
    """Interleaved RoPE of one vector at one position, in float64."""
    out = x.copy()
    for i, f in enumerate(inv_freq):
        c, s = np.cos(pos * f), np.sin(pos * f)
        out[2 * i], out[2 * i + 1] = x[2 * i] * c - x[2 * i + 1] * s, x[2 * i] * s + x[2 * i + 1] * c
    return out


def naive_mha(module: MHA, x_TD: np.ndarray) -> np.ndarray:
    """Token-by-token, head-by-head transcription of causal RoPE attention in float64."""
    cfg = module.cfg
    h, k = cfg.num_attention_heads, cfg.v_head_dim
    wq, wk, wv, wo = (np.asarray(m.kernel[...], np.float64) for m in
                      (module.q_proj, module.k_proj, module.v_proj, module.o_proj))
    inv_freq = rope_inv_freq(k, cfg.rope_theta, cfg.rope_scaling)
    assert cfg.rope_scaling is None  # the oracle is plain RoPE (YaRN would scale cos/sin)
    scale = softmax_scale(mha_head_config(cfg))
    q, key, v = (x_TD @ w for w in (wq, wk, wv))
    out = np.zeros((x_TD.shape[0], h * k))
    for t in range(x_TD.shape[0]):
        for head in range(h):
            sl = slice(head * k, (head + 1) * k)
            qt = rotate_pairs(q[t, sl], t, inv_freq)
            scores = np.array([qt @ rotate_pairs(key[s, sl], s, inv_freq) * scale for s in range(t + 1)])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[t, sl] = p @ v[: t + 1, sl]
    return out @ wo


def test_mha_matches_a_naive_float64_oracle():
    cfg = CFG.replace(rope_scaling=None)
    module = MHA(cfg, nnx.Rngs(params=0))
    # float32 inputs, fed exactly to the float64 oracle (so only the module's own float32 arithmetic differs)
    x = np.random.default_rng(0).standard_normal((2, 7, cfg.hidden_size)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    got = np.asarray(module(jnp.asarray(x), positions))
    for b in range(2):
        # reductions: q/k/v projections (32 terms), scores (8), softmax and probs @ V (7), o_proj (16); a few ulps
        # of their terms each, about the outputs' magnitude: 32 ulps of max |output| (measured 1.2)
        assert_close_f32(got[b], naive_mha(module, x[b].astype(np.float64)), atol_ulps=32)


def test_mha_is_causal():
    module = MHA(CFG, nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(1), (1, 6, CFG.hidden_size))
    positions = jnp.arange(6)[None]
    changed = x.at[:, 4:].set(0.0)
    # bit-identical in practice (masked keys weigh exactly 0); a few ulps of slack
    assert_close_f32(module(changed, positions)[:, :4], module(x, positions)[:, :4])


def test_mha_model_trains_and_counts():
    model = init_model(CFG)
    layer = model.dense_layers.self_attn  # the scanned dense stack
    assert isinstance(layer, MHA) and not hasattr(layer, "kv_b_proj")
    logits, _ = model(jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, CFG.vocab_size) and np.isfinite(np.asarray(logits)).all()
    grads = nnx.grad(lambda m: m(jnp.ones((1, 4), jnp.int32))[0].mean())(model)
    assert float(jnp.abs(grads.dense_layers.self_attn.k_proj.kernel[...]).sum()) > 0
    assert mha_cache_elements_per_token(CFG) == 2 * 2 * 8


def test_attention_field_is_validated_and_not_exported_to_hf():
    with pytest.raises(ConfigError, match="^attention"):
        CFG.replace(attention="gqa").validate()
    with pytest.raises(ConfigError, match="^attention"):
        to_hf(CFG)
    assert "attention" not in to_hf(get_preset("tiny"))
