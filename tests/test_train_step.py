"""Pure training math: schedule, objective, non-finite skipping, aux-loss-free bias updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import get_preset
from dsv3_jax.train.balance import max_violation, update_bias
from dsv3_jax.train.config import Config, TrainConfig, apply_overrides
from dsv3_jax.train.losses import cross_entropy, split_window
from dsv3_jax.train.optim import lr_schedule
from dsv3_jax.train.step import init_train_state, make_train_step
from tolerances import F32_EPS, assert_close_f32

TINY = get_preset("tiny").replace(init_std=0.02)


def _window(batch=4, seq=16, depth=1, seed=0, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, seq + 1 + depth), 0, vocab)


def test_lr_schedule_shape():
    cfg = TrainConfig(steps=100, peak_lr=1.0, final_lr_ratio=0.1, warmup_frac=0.1, decay_start_frac=0.5,
                      decay_end_frac=0.9)
    lr = np.array([float(lr_schedule(cfg)(s)) for s in range(100)])
    # The schedule is a few float32 operations (cos included) on values up to peak_lr: each lr is within a few
    # ulps of the exact value, relative and of peak_lr.
    peak = cfg.peak_lr
    assert_close_f32([lr[0], lr[9]], [0.1, 1.0], scale=peak)  # linear warmup
    assert_close_f32(lr[10:51], 1.0, scale=peak)  # constant
    # non-increasing up to rounding (one value's few ulps up, the next's down), and the cosine midpoint
    assert np.all(np.diff(lr[50:91]) <= 2 * F32_EPS * peak)
    assert_close_f32(lr[70], 0.55, scale=peak)
    assert_close_f32(lr[90:], 0.1, scale=peak)  # constant tail


def test_update_bias_and_maxvio():
    counts = jnp.array([10.0, 2.0, 4.0, 4.0])
    # 0 + float32(0.01) * sign: the float64 literals up to the rate's rounding to float32 (1/2 ulp)
    assert_close_f32(update_bias(jnp.zeros(4), counts, 0.01), [-0.01, 0.01, 0.01, 0.01], rtol_ulps=1, atol_ulps=0)
    assert float(max_violation(counts)) == pytest.approx((10 - 5) / 5)
    assert float(max_violation(jnp.full(4, 3.0))) == 0.0
    # vectorised over a stack of layers: each row is its own layer
    stacked = jnp.stack([counts, jnp.full(4, 3.0)])
    assert_close_f32(update_bias(jnp.zeros((2, 4)), stacked, 0.01), [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]],
                     rtol_ulps=1, atol_ulps=0)
    assert_close_f32(max_violation(stacked), [1.0, 0.0])


def _run(train_cfg, steps, model_cfg=TINY, skew=None, window=None):
    graphdef, state = init_train_state(model_cfg, train_cfg)
    if skew is not None:  # push every token towards the first experts through the router bias
        state = state.replace(biases=jax.tree.map(lambda b: b + jnp.broadcast_to(skew, b.shape), state.biases))
    step = jax.jit(make_train_step(graphdef, model_cfg, train_cfg))
    history = []
    for i in range(steps):
        state, metrics = step(state, _window(seed=i) if window is None else window)
        history.append(jax.device_get(metrics))
    return state, history


def test_training_reduces_loss_and_reports_metrics():
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=16, peak_lr=3e-3, warmup_frac=0.1)
    state, hist = _run(cfg, 30, window=_window())  # memorise one batch
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    assert hist[-1]["mtp_loss"] < hist[0]["mtp_loss"]
    assert int(state.step) == 30 and int(state.skipped_total) == 0
    assert hist[0]["maxvio_batch_layers"].shape == (TINY.n_moe_layers,)
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "maxvio_batch", "dropped_fraction"):
        assert np.isfinite(hist[-1][key]), key


def test_nonfinite_step_is_skipped():
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=16)
    graphdef, state = init_train_state(TINY, cfg)
    # An enormous embedding overflows the forward pass: loss and gradients become non-finite.
    params = state.params
    params["embed_tokens"]["embedding"][...] = params["embed_tokens"]["embedding"][...] * 1e38
    state = state.replace(params=params)
    before = jax.tree.map(np.asarray, (state.params, state.biases, state.opt_state))
    step = jax.jit(make_train_step(graphdef, TINY, cfg))
    state, metrics = step(state, _window())
    state, metrics = step(state, _window(seed=1))
    assert int(metrics["skipped"]) == 1 and int(state.nonfinite_streak) == 2 and int(state.skipped_total) == 2
    after = jax.tree.map(np.asarray, (state.params, state.biases, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["aux_free", "none"])
def test_aux_free_bias_update_fixes_a_skewed_router(mode):
    """With a router skewed towards a few experts (and the optimizer frozen), only aux_free restores balance."""
    cfg = TrainConfig(steps=40, batch_size=4, seq_len=16, peak_lr=1e-9, balance=mode, bias_update_rate=0.02)
    skew = jnp.zeros(TINY.n_routed_experts).at[:2].set(0.4)
    state, hist = _run(cfg, 40, skew=skew)
    early, late = np.mean([h["maxvio_batch"] for h in hist[:3]]), np.mean([h["maxvio_batch"] for h in hist[-5:]])
    assert early > 1.5  # badly skewed at the start
    if mode == "aux_free":
        assert late < 0.5 * early
        # the overloaded experts' biases went down
        biases = jax.tree.leaves(state.biases)
        assert all(np.all(np.asarray(b)[..., 0] < 0.4) for b in biases)  # [L_moe, E] stack and [E] MTP
    else:
        assert late > 0.9 * early
        for b in jax.tree.leaves(state.biases):  # never touched
            np.testing.assert_array_equal(np.asarray(b), np.broadcast_to(np.asarray(skew), b.shape))


def test_aux_loss_mode_uses_alpha_and_freezes_bias():
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=16, balance="aux_loss", balance_scope="batch")
    assert cfg.alpha == 1e-3
    state, hist = _run(cfg, 2)
    assert all(float(jnp.abs(b).max()) == 0.0 for b in jax.tree.leaves(state.biases))
    assert hist[0]["balance_loss"] > 0


def test_run_config_overrides_validate():
    cfg = apply_overrides(Config(), ["train.steps=7", "model.n_routed_experts=32", "train.balance=none"])
    assert cfg.train.steps == 7 and cfg.model.n_routed_experts == 32
    with pytest.raises(ValueError, match="train.balance"):
        apply_overrides(Config(), ["train.balance=sometimes"])
    with pytest.raises(ValueError, match="train.warmup_frac"):
        apply_overrides(Config(), ["train.warmup_frac=0.9", "train.decay_start_frac=0.5"])
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides(Config(), ["steps"])
    assert Config.from_dict(cfg.to_dict()) == cfg


def _relative_diff(a_tree, b_tree):
    """||a - b|| / ||b|| per leaf (Frobenius), the worst leaf.

    Norm-wise, not element-wise: Adam divides each gradient by its own running RMS, so an entry whose gradient
    is rounding noise (an lm_head column of a token absent from the batch) moves by a full learning rate in
    the noise's direction; summation order alone changes such an entry by ~lr, while the tensor as a whole
    agrees to float32 rounding (measured: worst leaf 5e-6 norm-wise, 1.3e-4 element-wise for lm_head)."""
    return max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


def test_grad_accum_equals_the_whole_batch():
    """grad_accum=4 at batch 32 is the batch-32 step: same loss, gradients summed in another order, and the
    router biases moved once per step by the counts of all four microbatches. (Accumulation wraps the whole
    forward/backward, so the layer layout does not matter; the default scanned one is used.)"""
    import dataclasses

    model_cfg = TINY
    whole = TrainConfig(steps=3, batch_size=32, seq_len=16, peak_lr=3e-3, warmup_frac=0.0, bias_update_rate=0.01)
    accum = dataclasses.replace(whole, grad_accum=4)
    assert accum.microbatch_size == 8
    windows = [_window(batch=32, seed=10 + i) for i in range(3)]
    results = {}
    for name, cfg in (("whole", whole), ("accum", accum)):
        graphdef, state = init_train_state(model_cfg, cfg)
        step = jax.jit(make_train_step(graphdef, model_cfg, cfg))
        history = []
        for i, window in enumerate(windows):
            state, metrics = step(state, window)
            history.append(jax.device_get(metrics))
            if i == 0:
                results[name + "_biases_1"] = jax.device_get(state.biases)
        results[name] = (jax.device_get(state), history)
    (s_whole, h_whole), (s_accum, h_accum) = results["whole"], results["accum"]
    assert _relative_diff(s_accum.params, s_whole.params) <= 1e-5
    # step 1 routes with identical parameters, so the global counts (integers) and the bias moves are identical
    for a, b in zip(jax.tree.leaves(results["accum_biases_1"]), jax.tree.leaves(results["whole_biases_1"])):
        np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(jax.tree.leaves(results["whole_biases_1"])[0]) != 0)  # the biases did move
    for key in ("loss", "mtp_loss", "balance_loss", "maxvio_batch", "grad_norm"):
        assert_close_f32(h_accum[0][key], h_whole[0][key], atol_ulps=16, err_msg=key)
    assert int(s_accum.step) == 3


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ValueError, match="train.grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4).validate()
    with pytest.raises(ValueError, match="train.grad_accum"):
        TrainConfig(grad_accum=0).validate()


class ObjectiveVariantsTest(chex.TestCase):
    """The objective's token cross-entropy and the MTP split, traced under jit and run op by op."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_matches_float64_log_softmax(self):
        rng = np.random.default_rng(4)
        logits = (rng.standard_normal((3, 5, 11)) * 4).astype(np.float32)
        targets = rng.integers(0, 11, (3, 5))
        got = self.variant(cross_entropy)(jnp.asarray(logits), jnp.asarray(targets))
        chex.assert_rank(got, 0)
        chex.assert_type(got, jnp.float32)
        x = logits.astype(np.float64)
        logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        ref = float((logz - np.take_along_axis(x, targets[..., None], -1)[..., 0]).mean())
        # log-sum-exp of 11 terms and a 15-term mean, at losses ~ |logits| ~ 12: a few ulps of the logits' scale
        assert_close_f32(got, ref, rtol_ulps=16, atol_ulps=16, scale=float(np.abs(x).max()))

    @chex.variants(with_jit=True, without_jit=True)
    def test_split_window_keeps_mtp_tokens_and_main_targets(self):
        window = jnp.arange(2 * 12).reshape(2, 12)  # seq_len 9 + 1 + depth 2
        inputs, targets = self.variant(split_window, static_argnums=(1, 2))(window, 9, 2)
        chex.assert_shape(inputs, (2, 11))
        chex.assert_shape(targets, (2, 9))
        chex.assert_trees_all_equal((inputs, targets), (window[:, :11], window[:, 1:10]))
