"""`ragged` MoE dispatch: single-device ragged_dot path against a dense oracle (outputs and gradients), and the
expert-parallel shard_map path on 8 fake CPU devices (run in a subprocess: see tests/_ragged_ep_check.py)."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from dsv3_jax.config import PRESETS
from dsv3_jax.moe import RoutedExperts
from dsv3_jax.moe_ragged import ragged_experts, ragged_experts_ep
from tolerances import F32_EPS, assert_close_f32

ROOT = Path(__file__).resolve().parent.parent
# ragged_dot, the dense oracle and the expert-parallel path run the same float32 reductions (D for gate/up, F for
# down, the top-k combine, and the token sums of the weight gradients) in other orders and groupings; the terms
# are about as large as the results, so they differ by a few ulps of the largest |value| of each output or
# gradient (measured up to 2.5 on one device, 3.7 across the 8-device meshes). A misrouted row is off by O(1).
ULPS = 16


def _within(err: float, scale: float) -> bool:
    """A max |difference| reported by _ragged_ep_check.py, against ULPS ulps of its tensor's max |value|."""
    return err <= ULPS * F32_EPS * scale


def dense_oracle(x_ND, topk_idx_NK, topk_weight_NK, gate_EDF, up_EDF, down_EFD):
    """Every expert on every token, combined with a [N, E] weight matrix that is zero for unchosen experts."""
    hi = jax.lax.Precision.HIGHEST
    h_NEF = (jax.nn.silu(jnp.einsum("nd,edf->nef", x_ND, gate_EDF, precision=hi))
             * jnp.einsum("nd,edf->nef", x_ND, up_EDF, precision=hi))
    y_NED = jnp.einsum("nef,efd->ned", h_NEF, down_EFD, precision=hi)
    mask_NKE = jax.nn.one_hot(topk_idx_NK, gate_EDF.shape[0], dtype=jnp.float32)
    combine_NE = jnp.einsum("nk,nke->ne", topk_weight_NK, mask_NKE, precision=hi)
    return jnp.einsum("ned,ne->nd", y_NED, combine_NE, precision=hi)


def make_case(n, d, f, e, k, used_experts, seed):
    """Random float32 inputs; each token picks k distinct experts among the first `used_experts` (rest get none)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(used_experts, k, replace=False) for _ in range(n)]).astype(np.int32)
    arrays = dict(
        x=rng.standard_normal((n, d)), w=rng.random((n, k)) + 0.1, gate=rng.standard_normal((e, d, f)) * 0.3,
        up=rng.standard_normal((e, d, f)) * 0.3, down=rng.standard_normal((e, f, d)) * 0.3,
        ct=rng.standard_normal((n, d)))
    return jnp.asarray(idx), {name: jnp.asarray(a, jnp.float32) for name, a in arrays.items()}


def out_and_grads(fn, idx, a):
    """fn's output and the gradients of sum(out * ct) wrt x, topk_weight and the three expert weights."""
    def loss(x, w, gate, up, down):
        out = fn(x, idx, w, gate, up, down)
        return jnp.sum(out * a["ct"]), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
        a["x"], a["w"], a["gate"], a["up"], a["down"])
    return out, dict(zip(("x", "w", "gate", "up", "down"), grads))


# (N, D, F, E, K, experts actually used): unused experts get zero tokens; the last case sends everything to one.
CASES = {"spread": (48, 16, 8, 12, 3, 9), "top1": (20, 8, 4, 6, 1, 4), "one_expert": (16, 8, 4, 5, 1, 1)}


@pytest.mark.parametrize("grouped_gemm", ["ragged_dot", "blocks"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ragged_matches_dense_oracle(name, grouped_gemm):
    n, d, f, e, k, used = CASES[name]
    idx, a = make_case(n, d, f, e, k, used, seed=len(name))
    out, grads = out_and_grads(functools.partial(ragged_experts, grouped_gemm=grouped_gemm), idx, a)
    ref_out, ref_grads = out_and_grads(dense_oracle, idx, a)
    assert out.shape == (n, d) and out.dtype == jnp.float32
    assert_close_f32(out, ref_out, atol_ulps=ULPS)
    for param in grads:  # each gradient against its own max |value|
        assert_close_f32(grads[param], ref_grads[param], atol_ulps=ULPS, err_msg=param)
    unused = np.setdiff1d(np.arange(e), np.asarray(idx))
    assert unused.size and not np.any(np.asarray(grads["gate"])[unused])  # empty experts get no gradient


def test_ragged_matches_routed_experts_dense():
    """Same numbers as the module's own `dense` dispatch, fed the module's (cast) weights."""
    cfg = PRESETS["tiny"].replace(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2).validate()
    experts = RoutedExperts(cfg, nnx.Rngs(0))
    idx, a = make_case(24, cfg.hidden_size, cfg.moe_intermediate_size, 8, 2, 8, seed=3)
    got = ragged_experts(a["x"], idx, a["w"], *experts._weights())
    want = experts.dense(a["x"], idx, a["w"])
    assert got.dtype == want.dtype == jnp.float32  # the tiny preset computes in float32
    assert_close_f32(got, want, atol_ulps=ULPS)  # outputs ~6e-5 here (init_std): an absolute 1e-5 was 17% of them


def test_blocks_with_many_groups_small_blocks_and_empty_rows():
    """`_blocked_grouped_swiglu` against ragged_dot where blocks straddle steps, groups are empty or span several
    blocks, and trailing rows past the groups must come out zero."""
    from dsv3_jax.moe_ragged import _blocked_grouped_swiglu, _grouped_swiglu

    rng = np.random.default_rng(11)
    sizes = jnp.asarray([5, 0, 9, 1, 0, 3], jnp.int32)  # 18 grouped rows
    rows = jnp.asarray(rng.standard_normal((21, 8)), jnp.float32).at[18:].set(0.0)
    gate, up = (jnp.asarray(rng.standard_normal((6, 8, 4)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((6, 4, 8)), jnp.float32)
    want = _grouped_swiglu(rows, gate, up, down, sizes, "ragged_dot")
    for block, per_step in ((2, 3), (4, 1), (128, 8)):
        got = _blocked_grouped_swiglu(rows, gate, up, down, sizes, block=block, blocks_per_step=per_step)
        assert_close_f32(got, want, atol_ulps=ULPS, err_msg=f"block={block}")
        assert not np.any(np.asarray(got)[18:])


def test_ep_on_one_device_mesh():
    """The expert-parallel path degenerates correctly to a 1-device mesh (runs in this process)."""
    mesh = jax.make_mesh((1, 1, 1), ("data", "expert", "tensor"), axis_types=(AxisType.Auto,) * 3)
    idx, a = make_case(16, 8, 4, 6, 2, 5, seed=7)
    out, counts, dropped = jax.jit(lambda *args: ragged_experts_ep(*args, mesh=mesh))(
        a["x"], idx, a["w"], a["gate"], a["up"], a["down"])
    assert int(dropped) == 0
    assert_close_f32(out, ragged_experts(a["x"], idx, a["w"], a["gate"], a["up"], a["down"]), atol_ulps=ULPS)
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(idx).ravel(), minlength=6))


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_axes=("data",)), "must be one of token_axes"),
    (dict(expert_axis="experts"), "not in mesh axes"),
    (dict(transport="nccl"), "transport"),
])
def test_ep_rejects_bad_arguments(kwargs, match):
    mesh = jax.make_mesh((1, 1, 1), ("data", "expert", "tensor"), axis_types=(AxisType.Auto,) * 3)
    idx, a = make_case(4, 8, 4, 2, 1, 2, seed=0)
    with pytest.raises(ValueError, match=match):
        ragged_experts_ep(a["x"], idx, a["w"], a["gate"], a["up"], a["down"], mesh=mesh, **kwargs)


# ---- 8 fake CPU devices, in a subprocess (this process's JAX may already be initialised with 1 device) ----

MESHES = ["(2, 2, 2)", "(1, 8, 1)", "(4, 2, 1)"]
E_TOTAL, D_MODEL, F_WIDTH = 16, 16, 8  # the shapes tests/_ragged_ep_check.py uses (its E, D, F)


@pytest.fixture(scope="module")
def ep_results():
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    if not any("backend_optimization_level" in f for f in flags):
        flags.append("--xla_backend_optimization_level=0")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_ragged_ep_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_padded_transport_follows_ragged_all_to_all_semantics(ep_results):
    # The worked example of jax.lax.ragged_all_to_all's docstring.
    assert ep_results["padded_doc_example"] == [[1, 3, 0, 0], [2, 2, 4, 0]]


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("mesh", MESHES)
def test_ep_matches_single_device(ep_results, mesh, routing):
    r = ep_results[f"{mesh}/{routing}"]
    assert _within(r["out_err"], r["out_scale"]), r
    for param, err in r["grad_err"].items():
        assert _within(err, r["grad_scale"][param]), (param, r)
    assert r["counts"] == r["bincount"]  # global (psum'd) loads, not one shard's


@pytest.mark.parametrize("mesh", MESHES)
def test_ep_shards_experts_and_uses_all_to_all(ep_results, mesh):
    r = ep_results[f"{mesh}/placement"]
    local = r["expected_local_experts"]
    assert r["local_expert_rows"] == [local]
    assert r["compiled_weight_shard_rows"] == [local] * 3
    assert r["hlo_all_to_all"] and not r["hlo_all_gather"]
    # transport="ragged" (GPU/TPU) lowers to 2 ragged_all_to_all forward + 2 transposed ones backward.
    assert ep_results[f"{mesh}/ragged_lowering_ops"] == 4


def test_ep_splits_expert_width_over_tensor(ep_results):
    """On (2, 2, 2) with tensor_axis: each device holds E/2 experts x F/2 width, and the result still equals the
    single-device path (partial down projections are psum'd over tensor, not gathered)."""
    r = ep_results["(2, 2, 2)/tensor"]
    assert r["weight_shard_shape"] == [E_TOTAL // 2, D_MODEL, F_WIDTH // 2]
    assert _within(r["out_err"], r["out_scale"]), r
    for param, err in r["grad_err"].items():
        assert _within(err, r["grad_scale"][param]), (param, r)
    assert not r["hlo_all_gather"]


def test_ep_rejects_tensor_axis_that_is_the_expert_axis():
    mesh = jax.make_mesh((1, 1, 1), ("data", "expert", "tensor"), axis_types=(AxisType.Auto,) * 3)
    idx, a = make_case(4, 8, 4, 2, 1, 2, seed=0)
    with pytest.raises(ValueError, match="must differ"):
        ragged_experts_ep(a["x"], idx, a["w"], a["gate"], a["up"], a["down"], mesh=mesh, tensor_axis="expert")


@pytest.mark.parametrize("mesh", ["(1, 8, 1)", "(2, 2, 2)"])
def test_ep_capacity_factor_drops_exactly_the_pair_overflow(ep_results, mesh):
    """With capacity_factor=1 and routing skewed towards expert shard 0, each (token shard, expert shard) pair
    keeps its first ceil(n*K/P) rows: the output equals the one-device path with exactly those assignments."""
    r = ep_results[f"{mesh}/capacity"]
    assert r["capacity"] < r["dropless_capacity"]
    assert r["dropped"] == r["expected_dropped"] > 0
    assert _within(r["out_err"], r["out_scale"]), r
