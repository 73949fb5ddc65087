"""Router semantics (reference + hypothesis invariants), dispatch equivalence, balance losses, bias handling."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from dsv3_jax.backend_policy import choose
from dsv3_jax.config import PRESETS
from dsv3_jax.moe import MoE, RouterBias, balance_losses, expert_capacity, route
from tolerances import F32_EPS, assert_close_f32, assert_trees_close_f32

TINY = PRESETS["tiny"]


def _weight_ulps(k: int) -> int:
    """Relative ulps between two float32 computations of k routing weights: each side sums k positive terms in
    its own order ((k-1)/2 ulps), divides and scales (1/2 ulp each); XLA's sigmoid (~1 ulp, measured 1.2 against
    float64) enters numerator and sum. k + 6 covers it with room; a wrong expert or a missed normalisation is off
    by percents."""
    return k + 6


# Sparse dispatch (capacity / blocked / ragged) and the dense oracle run the same three float32 reductions
# (D = 32 for gate/up, F = 16 for down, the top-k combine), but in other orders: other GEMM shapes, kernels and
# fusions. Each output's terms are about as large as the largest output, so the paths may differ by a few ulps
# of max |output| per reduction (measured: up to 3.7 for outputs, 4.7 for gradients, per leaf, on AMD EPYC with
# XLA backend optimisation levels 0 and 2). A routing or weighting bug is off by O(0.1).
DISPATCH_ULPS = 16


def reference_route(logits, bias, cfg):
    """Literal per-token transcription of docs/semantics.md §5 in float64."""
    idx_all, w_all = [], []
    for row in logits.astype(np.float64):
        s = 1 / (1 + np.exp(-row))
        b = s + bias
        if cfg.n_group > 1:
            groups = b.reshape(cfg.n_group, -1)
            gscore = np.sort(groups, axis=1)[:, -2:].sum(1)
            kept = np.argsort(-gscore, kind="stable")[:cfg.topk_group]
            mask = np.zeros(cfg.n_group, bool)
            mask[kept] = True
            b = np.where(np.repeat(mask, cfg.experts_per_group), b, -np.inf)
        idx = np.argsort(-b, kind="stable")[:cfg.num_experts_per_tok]
        w = s[idx]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        idx_all.append(idx)
        w_all.append(w * cfg.routed_scaling_factor)
    return np.array(idx_all), np.array(w_all)


def _sorted(idx, w):
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)


CONFIGS = {
    "groups": TINY.replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "one_group": TINY.replace(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3),
    "unnormalised": TINY.replace(n_routed_experts=12, n_group=3, topk_group=1, num_experts_per_tok=2,
                                 norm_topk_prob=False, routed_scaling_factor=1.5),
}


class RouteTest(chex.TestCase):
    """The router against the float64 reference, traced under jit and run op by op: the same decisions."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(CONFIGS))
    def test_route_matches_reference(self, name):
        cfg = CONFIGS[name].validate()
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((64, cfg.n_routed_experts)).astype(np.float32) * 2
        bias = rng.standard_normal(cfg.n_routed_experts).astype(np.float32) * 0.3
        idx, w, scores = self.variant(route, static_argnums=2)(jnp.asarray(logits), jnp.asarray(bias), cfg)
        chex.assert_shape((idx, w), (64, cfg.num_experts_per_tok))
        chex.assert_shape(scores, (64, cfg.n_routed_experts))
        chex.assert_type((idx, w, scores), (jnp.int32, jnp.float32, jnp.float32))
        ref_idx, ref_w = reference_route(logits, bias, cfg)
        got_idx, got_w = _sorted(np.asarray(idx), np.asarray(w))
        ref_idx, ref_w = _sorted(ref_idx, ref_w)
        np.testing.assert_array_equal(got_idx, ref_idx)
        assert_close_f32(got_w, ref_w, rtol_ulps=_weight_ulps(cfg.num_experts_per_tok), atol_ulps=0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_balance_losses_are_scalars_and_one_for_uniform_routing(self):
        t, e, k = 10, 8, 2
        uniform_idx = jnp.asarray(np.arange(t * k).reshape(1, t, k) % e)
        seq, batch = self.variant(balance_losses, static_argnums=2)(jnp.full((1, t, e), 0.5), uniform_idx, e)
        chex.assert_rank((seq, batch), 0)
        assert_close_f32(jnp.stack([seq, batch]), np.ones(2), rtol_ulps=8, atol_ulps=0)


_jit_route = jax.jit(route, static_argnums=2)


@st.composite
def router_case(draw):
    n_group = draw(st.sampled_from([1, 2, 4, 8]))
    per_group = draw(st.integers(2, 6))
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * per_group))
    cfg = TINY.replace(n_routed_experts=n_group * per_group, n_group=n_group, topk_group=topk_group,
                       num_experts_per_tok=k, norm_topk_prob=draw(st.booleans()),
                       routed_scaling_factor=draw(st.sampled_from([1.0, 2.5]))).validate()
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((8, cfg.n_routed_experts)).astype(np.float32) * draw(st.sampled_from([0.5, 3.0]))
    bias = rng.standard_normal(cfg.n_routed_experts).astype(np.float32) * draw(st.sampled_from([0.0, 0.1, 1.0]))
    return cfg, logits, bias


@given(router_case())
def test_router_invariants(case):
    cfg, logits, bias = case
    idx, w, scores = (np.asarray(a) for a in _jit_route(logits, bias, cfg))
    k = cfg.num_experts_per_tok
    assert idx.shape == (8, k) and w.shape == (8, k)
    for row_idx, row_w, row_s in zip(idx, w, scores):
        assert len(set(row_idx.tolist())) == k  # k distinct experts
        assert len(set((row_idx // cfg.experts_per_group).tolist())) <= cfg.topk_group  # inside the kept groups
        # weights come from the *unbiased* sigmoid of the chosen experts
        expected = row_s[row_idx]
        if cfg.norm_topk_prob:
            expected = expected / expected.sum()
            # one more k-term sum (numpy's) on top of the weights' own error
            assert row_w.sum() == pytest.approx(cfg.routed_scaling_factor, rel=(_weight_ulps(k) + k) * F32_EPS)
        assert_close_f32(row_w, expected * cfg.routed_scaling_factor, rtol_ulps=_weight_ulps(k), atol_ulps=0)
        # chosen experts beat every unchosen expert of a chosen group on the biased score
        biased = row_s + bias
        chosen_groups = set((row_idx // cfg.experts_per_group).tolist())
        others = [e for e in range(cfg.n_routed_experts)
                  if e not in row_idx and e // cfg.experts_per_group in chosen_groups]
        if others:  # up to a few ulps: the selection's sigmoid + bias may be fused and rounded apart from `scores`
            assert biased[row_idx].min() >= biased[others].max() - 4 * F32_EPS * np.abs(biased).max()


@given(router_case())
def test_bias_changes_selection_never_weights(case):
    cfg, logits, _ = case
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(cfg.n_routed_experts).astype(np.float32) * 5
    idx0, w0, s0 = _jit_route(logits, np.zeros(cfg.n_routed_experts, np.float32), cfg)
    idx1, w1, s1 = _jit_route(logits, bias, cfg)
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))  # affinities do not see the bias
    ulps = _weight_ulps(cfg.num_experts_per_tok)
    for i0, i1, a, b, s in zip(*(np.asarray(x) for x in (idx0, idx1, w0, w1, s0))):
        if set(i0.tolist()) == set(i1.tolist()):  # same experts -> same weights (summed in another order)
            assert_close_f32(np.sort(b), np.sort(a), rtol_ulps=ulps, atol_ulps=0)
        else:  # different experts, but weights still the unbiased sigmoid of the new choice
            e = s[i1] / (s[i1].sum() + 1e-20) if cfg.norm_topk_prob else s[i1]
            assert_close_f32(b, e * cfg.routed_scaling_factor, rtol_ulps=ulps, atol_ulps=0)


def test_large_bias_forces_selection():
    cfg = CONFIGS["one_group"]
    logits = jnp.zeros((4, cfg.n_routed_experts)).at[:, 0].set(5.0)
    bias = jnp.zeros(cfg.n_routed_experts).at[7].set(10.0)
    idx, _, _ = route(logits, bias, cfg)
    assert all(7 in row for row in np.asarray(idx).tolist())


def _moe(cfg, seed=0):
    moe = MoE(cfg.replace(init_std=0.2), nnx.Rngs(params=seed))
    moe.gate.bias[...] = jax.random.normal(jax.random.key(seed + 1), moe.gate.bias[...].shape) * 0.2
    return moe


DROPLESS_CASES = ([(name, "capacity") for name in sorted(CONFIGS)]
                  + [(name, dispatch) for dispatch in ("blocked", "ragged") for name in ("groups", "unnormalised")])


@pytest.mark.parametrize("name,dispatch", DROPLESS_CASES)
def test_sparse_dispatch_equals_dense_when_dropless(name, dispatch):
    cfg = CONFIGS[name]
    x = jax.random.normal(jax.random.key(0), (3, 11, cfg.hidden_size))
    dense = _moe(cfg.replace(moe_dispatch="dense"))
    capacity = _moe(cfg.replace(moe_dispatch=dispatch))
    (yd, ad), (yc, ac) = nnx.jit(lambda m: m(x))(dense), nnx.jit(lambda m: m(x))(capacity)
    assert_close_f32(yc, yd, atol_ulps=DISPATCH_ULPS)
    assert float(ac.dropped_fraction) == 0.0
    np.testing.assert_array_equal(np.asarray(ac.expert_counts), np.asarray(ad.expert_counts))
    # gradients agree too (the capacity path's scatters must be differentiable the same way)
    grad_fn = nnx.jit(nnx.grad(lambda m: (m(x)[0] ** 2).sum()))
    gd, gc = grad_fn(dense), grad_fn(capacity)
    assert_trees_close_f32(gc, gd, atol_ulps=DISPATCH_ULPS)  # each leaf against its own max |gradient|


@pytest.mark.parametrize("n_experts, top_k", [(16, 2), (32, 3)])  # K=1 normalised: a zero router gradient
def test_dropless_capacity_spill_equals_dense(n_experts, top_k):
    """Dropless `capacity` with more than 4K experts fills 1.25x the fair share of slots and spills the rest to
    the block-padded grouped GEMM: same outputs, gradients and counts as the oracle, nothing dropped, and
    (with the router biased towards a few experts) many assignments really spill."""
    cfg = TINY.replace(n_routed_experts=n_experts, n_group=1, topk_group=1, num_experts_per_tok=top_k)
    x = jax.random.normal(jax.random.key(3), (4, 16, cfg.hidden_size))
    dense, spill = _moe(cfg.replace(moe_dispatch="dense")), _moe(cfg.replace(moe_dispatch="capacity"))
    for m in (dense, spill):  # crowd three experts: their loads run far past 1.25x the fair share
        m.gate.bias[...] = m.gate.bias[...].at[:3].add(5.0)
    assert choose(spill.cfg, "cpu").capacity_spill
    (yd, ad), (ys, as_) = nnx.jit(lambda m: m(x))(dense), nnx.jit(lambda m: m(x))(spill)
    counts = np.asarray(ad.expert_counts)
    fair = 64 * top_k / n_experts
    assert counts.max() > 3 * fair  # spilled rows exist
    assert_close_f32(ys, yd, atol_ulps=DISPATCH_ULPS)
    assert float(as_.dropped_fraction) == 0.0
    np.testing.assert_array_equal(np.asarray(as_.expert_counts), counts)
    grad_fn = nnx.jit(nnx.grad(lambda m: (m(x)[0] ** 2).sum()))
    assert_trees_close_f32(grad_fn(spill), grad_fn(dense), atol_ulps=DISPATCH_ULPS)


def test_blocked_dispatch_with_small_blocks_and_idle_experts():
    """Blocks smaller than an expert's load, experts with no tokens and trailing empty blocks all agree."""
    cfg = CONFIGS["one_group"]
    moe = _moe(cfg)
    x_nd = jax.random.normal(jax.random.key(5), (13, cfg.hidden_size))
    idx = jnp.asarray(np.random.default_rng(0).permuted(np.tile(np.arange(3), (13, 1)), axis=1))  # experts 0-2 only
    w = jax.random.uniform(jax.random.key(6), (13, 3))
    oracle = moe.experts.dense(x_nd, idx, w)
    for block in (1, 4, 16, 64):
        assert_close_f32(moe.experts.blocked(x_nd, idx, w, block=block), oracle, atol_ulps=DISPATCH_ULPS,
                         err_msg=f"block={block}")


def test_capacity_factor_drops_and_reports():
    cfg = CONFIGS["groups"].replace(moe_dispatch="capacity", capacity_factor=0.5)
    moe = _moe(cfg)
    x = jax.random.normal(jax.random.key(3), (2, 16, cfg.hidden_size))
    _, aux = nnx.jit(lambda m: m(x))(moe)
    counts = np.asarray(aux.expert_counts)
    cap = expert_capacity(32, cfg.num_experts_per_tok, cfg.n_routed_experts, 0.5)
    assert cap == math.ceil(0.5 * 32 * 4 / 16)
    expected = np.maximum(counts - cap, 0).sum() / counts.sum()
    assert float(aux.dropped_fraction) == pytest.approx(expected)
    assert expected > 0
    # dropping the overflow equals the dense oracle with those assignments' weights zeroed
    idx, w = np.asarray(aux.topk_idx), np.asarray(aux.topk_weight).copy()
    seen = np.zeros(cfg.n_routed_experts, int)
    for flat in range(idx.size):  # token-major order: earlier tokens keep their slots
        t, j = divmod(flat, idx.shape[1])
        seen[idx[t, j]] += 1
        if seen[idx[t, j]] > cap:
            w[t, j] = 0.0
    x_nd = x.reshape(-1, cfg.hidden_size)
    oracle = moe.experts.dense(x_nd, jnp.asarray(idx), jnp.asarray(w))
    routed, _ = moe.experts.capacity(x_nd, jnp.asarray(idx), aux.topk_weight)
    assert_close_f32(routed, oracle, atol_ulps=DISPATCH_ULPS)


def test_balance_losses_formula():
    rng = np.random.default_rng(0)
    b, t, e, k = 3, 10, 8, 2
    scores = 1 / (1 + np.exp(-rng.standard_normal((b, t, e))))
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) for _ in range(b)])
    seq, batch = balance_losses(jnp.asarray(scores, jnp.float32), jnp.asarray(idx), e)
    p = scores / scores.sum(-1, keepdims=True)
    per_seq = []
    for bi in range(b):
        f = np.bincount(idx[bi].ravel(), minlength=e) * e / (k * t)
        per_seq.append((f * p[bi].mean(0)).sum())
    # float32 against float64, all terms positive (no cancellation): the inputs' rounding (1/2 ulp), the
    # E-term normalisation, the mean over tokens, the E-term sum and the batch mean, 1/2 ulp per addition
    # (worst case), plus a few single roundings
    assert float(seq) == pytest.approx(np.mean(per_seq), rel=((e + t + e + b) / 2 + 4) * F32_EPS)
    f_all = np.bincount(idx.ravel(), minlength=e) * e / (k * t * b)
    assert float(batch) == pytest.approx((f_all * p.mean((0, 1))).sum(), rel=((e + b * t + e) / 2 + 4) * F32_EPS)
    # perfectly uniform routing and affinities give exactly 1
    uniform_idx = np.arange(t * k).reshape(1, t, k) % e
    seq_u, _ = balance_losses(jnp.full((1, t, e), 0.5), jnp.asarray(uniform_idx), e)
    assert float(seq_u) == pytest.approx(1.0)


def test_router_bias_is_not_a_param_and_gets_no_gradient():
    moe = _moe(CONFIGS["groups"])
    assert isinstance(moe.gate.bias, RouterBias) and not isinstance(moe.gate.bias, nnx.Param)
    params = nnx.state(moe, nnx.Param)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "gate.bias" not in paths and "gate.kernel" in paths
    x = jax.random.normal(jax.random.key(0), (1, 5, CONFIGS["groups"].hidden_size))
    grads = nnx.jit(nnx.grad(lambda m: m(x)[0].sum()))(moe)
    assert "gate.bias" not in {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
