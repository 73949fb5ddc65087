"""The chunked LM-head loss (dsv3_jax/head_loss.py) against a float64 oracle, through the training objective
against whole logits, and in the memory plan. Under a mesh it is checked by tests/_kernel_mesh_check.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import backend_policy
from dsv3_jax.config import get_preset
from dsv3_jax.head_loss import chunked_cross_entropy
from dsv3_jax.plan import activation_breakdown
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import _forward, init_train_state
from tolerances import assert_close_f32


def _oracle(hidden_HBTD, kernel_DV, targets_HBT):
    """Per-head mean CE and its gradients in float64 (numpy)."""
    h, w = hidden_HBTD.astype(np.float64), kernel_DV.astype(np.float64)
    logits = np.einsum("hbtd,dv->hbtv", h, w)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    n = targets_HBT.shape[1] * targets_HBT.shape[2]
    onehot = np.eye(w.shape[1])[targets_HBT]
    losses = -(log_probs * onehot).sum((1, 2, 3)) / n
    # gradient of sum over heads of the per-head means
    dlogits = (np.exp(log_probs) - onehot) / n
    return losses, np.einsum("hbtv,dv->hbtd", dlogits, w), np.einsum("hbtd,hbtv->dv", h, dlogits)


@pytest.mark.parametrize("seq_len, chunk", [(24, 8), (21, 8), (5, 16)])  # whole chunks, a padded last one, one
def test_values_and_gradients_match_float64_oracle(seq_len, chunk):
    rng = np.random.default_rng(seq_len)
    heads, batch, dim, vocab = 2, 3, 16, 40
    hidden = rng.normal(size=(heads, batch, seq_len, dim)).astype(np.float32)
    kernel = (0.3 * rng.normal(size=(dim, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, (heads, batch, seq_len))
    want, want_dh, want_dw = _oracle(hidden, kernel, targets)

    def total(h, w):
        losses = chunked_cross_entropy(h, w, jnp.asarray(targets), chunk, jnp.float32)
        return jnp.sum(losses), losses

    (_, got), (got_dh, got_dw) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(hidden), jnp.asarray(kernel))
    assert got.shape == (heads,)
    assert_close_f32(got, want, rtol_ulps=64, atol_ulps=64)
    assert_close_f32(got_dh, want_dh, rtol_ulps=64, atol_ulps=64)
    assert_close_f32(got_dw, want_dw, rtol_ulps=64, atol_ulps=64)


def test_bf16_matches_whole_logits_in_bf16():
    """In bf16 the GEMM's dtype sets the error: the loss and the hidden gradient equal the XLA path's (the same
    bf16 products), the head gradient is accumulated in fp32 over chunks (XLA: one bf16-output GEMM)."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(1, 2, 32, 16)), jnp.float32)
    kernel = jnp.asarray(0.3 * rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (1, 2, 32)))

    def whole(h, w):
        logits = jnp.einsum("hbtd,dv->hbtv", h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, 8, jnp.bfloat16)[0]

    want, (want_dh, want_dw) = jax.value_and_grad(whole, argnums=(0, 1))(hidden, kernel)
    got, (got_dh, got_dw) = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, kernel)
    assert_close_f32(got, want, rtol_ulps=64, atol_ulps=64)
    np.testing.assert_allclose(got_dh, want_dh, rtol=2e-2, atol=1e-3 * float(jnp.max(jnp.abs(want_dh))))
    np.testing.assert_allclose(got_dw, want_dw, rtol=2e-2, atol=1e-2 * float(jnp.max(jnp.abs(want_dw))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_objective_is_the_same_with_the_chunked_loss(monkeypatch, dtype):
    """The tiny model's objective (main head + MTP head) and every parameter gradient: loss_impl=chunked with
    8-position chunks equals whole logits."""
    monkeypatch.setattr(backend_policy, "LOSS_CHUNK_POSITIONS", 8)
    base = get_preset("tiny").replace(dtype=dtype)
    assert base.mtp_depth >= 1
    train_cfg = TrainConfig(seq_len=20, batch_size=2)
    graphdef, state = init_train_state(base, train_cfg)
    window = jax.random.randint(jax.random.PRNGKey(1), (2, 20 + 1 + base.mtp_depth), 0, base.vocab_size)
    results = {}
    for impl in ("xla", "chunked"):
        cfg = base.replace(loss_impl=impl)
        assert backend_policy.choose(cfg, "cpu").loss == impl
        fn = jax.value_and_grad(lambda p, c=cfg: _forward(graphdef, p, state.biases, window, c, train_cfg),
                                has_aux=True)
        results[impl] = jax.jit(fn)(state.params)
    (want, (want_parts, _)), want_grads = results["xla"]
    (got, (got_parts, _)), got_grads = results["chunked"]
    for key in ("loss", "mtp_loss", "total_loss"):
        assert_close_f32(got_parts[key], want_parts[key], rtol_ulps=64, atol_ulps=64)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    # fp32: summation order only; bf16: the head gradient's fp32 accumulation against XLA's bf16 output
    bound = 1e-6 if dtype == "float32" else 2e-2
    for want_g, got_g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
        assert float(jnp.max(jnp.abs(want_g - got_g))) <= bound * scale


def test_policy_and_plan():
    """auto: whole logits on CPU (the training curve is unchanged), chunked on GPU/TPU; the plan counts the
    chunked loss's kept bytes (no logits) and its transient (the head's fp32 gradient and one chunk)."""
    v3 = get_preset("deepseek-v3-671b")
    assert [backend_policy.choose(v3, b).loss for b in ("cpu", "gpu", "tpu")] == ["xla", "chunked", "chunked"]
    assert backend_policy.choose(v3, "gpu").loss_chunk == backend_policy.LOSS_CHUNK_POSITIONS
    assert backend_policy.choose(v3.replace(loss_impl="xla"), "tpu").loss == "xla"
    whole = activation_breakdown(v3.replace(loss_impl="xla"), 4, 4096, backend="gpu")
    chunked = activation_breakdown(v3, 4, 4096, backend="gpu")
    heads, tokens, vocab = 1 + v3.mtp_depth, 4 * 4096, v3.vocab_size
    assert chunked["logits"] == heads * tokens * (v3.hidden_size * 2 + 4)
    assert whole["logits"] > 2 * tokens * vocab * 4  # fp32 logits and log-softmax per head
    assert chunked["logits"] < whole["logits"] / 50
