"""Scanned layer stacks and rematerialisation: the scanned and unrolled layouts compute the same model, and
every remat policy gives the gradients of `none` (docs/design.md, "Scanned layers, ...")."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import get_preset
from dsv3_jax.layout import relayout
from dsv3_jax.model import init_model
from dsv3_jax.moe import RouterBias
from dsv3_jax.remat_names import MINIMAL_SAVED
from dsv3_jax.stack import REMAT_POLICIES
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import _forward
from tolerances import assert_close_f32, assert_trees_close_f32

# Two MoE layers after one dense layer and an MTP block: both stacks and the unrolled MTP path run.
TINY = get_preset("tiny").replace(init_std=0.1, num_hidden_layers=3, first_k_dense_replace=1)
TRAIN = TrainConfig(batch_size=2, seq_len=12)


def _window(seed=0, cfg=TINY):
    return jax.random.randint(jax.random.key(seed), (2, TRAIN.seq_len + 1 + cfg.mtp_depth), 0, cfg.vocab_size)


def _apply(model, ids):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, i: nnx.merge(graphdef, s)(i, return_hidden=True))(state, ids)


def _loss_and_grads(model, window):
    graphdef, params, biases = nnx.split(model, nnx.Param, RouterBias)
    fn = jax.jit(jax.value_and_grad(lambda p: _forward(graphdef, p, biases, window, model.cfg, TRAIN)[0]))
    return fn(params)


def _by_layer(model, tree):
    """{unrolled per-layer name: array} of a params-shaped tree, whatever the model's layout."""
    unrolled = relayout(nnx.merge(nnx.graphdef(model), tree, nnx.state(model, RouterBias)), scan_layers=False)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(unrolled, nnx.Param))}


def test_relayout_round_trip_is_exact():
    scanned = init_model(TINY, seed=1)
    back = relayout(relayout(scanned, scan_layers=False), scan_layers=True)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                              nnx.state(scanned), nnx.state(back))
    assert all(jax.tree.leaves(chex_equal))
    assert jax.tree.structure(nnx.state(scanned)) == jax.tree.structure(nnx.state(back))


def test_scanned_and_unrolled_layouts_agree():
    scanned = init_model(TINY, seed=2)
    unrolled = relayout(scanned, scan_layers=False)
    assert hasattr(unrolled, "layers") and not hasattr(scanned, "layers")
    ids = _window()[:, :TRAIN.seq_len]
    (ls, aux_s), (lu, aux_u) = _apply(scanned, ids), _apply(unrolled, ids)
    # one layer body traced once (scan) against three traced copies: the same ops, fused alike; a few ulps
    assert_close_f32(ls, lu, atol_ulps=16)
    np.testing.assert_array_equal(np.asarray(aux_s.moe.topk_idx), np.asarray(aux_u.moe.topk_idx))
    np.testing.assert_array_equal(np.asarray(aux_s.per_router("expert_counts")),
                                  np.asarray(aux_u.per_router("expert_counts")))
    loss_s, grads_s = _loss_and_grads(scanned, _window())
    loss_u, grads_u = _loss_and_grads(unrolled, _window())
    assert_close_f32(loss_s, loss_u)
    gs, gu = _by_layer(scanned, grads_s), _by_layer(unrolled, grads_u)
    assert gs.keys() == gu.keys()
    for name in gs:
        assert_close_f32(gs[name], gu[name], atol_ulps=64, err_msg=name)


# Every policy in both layouts with capacity dispatch, and blocked (other expert GEMM tags) once.
REMAT_CASES = [(remat, scan, "capacity") for remat in REMAT_POLICIES if remat != "none" for scan in (True, False)]
REMAT_CASES.append(("full", True, "blocked"))


@pytest.mark.parametrize("remat, scan_layers, dispatch", REMAT_CASES,
                         ids=[f"{r}-{'scanned' if s else 'unrolled'}-{d}" for r, s, d in REMAT_CASES])
def test_remat_gradients_equal_no_remat(remat, scan_layers, dispatch):
    cfg = TINY.replace(scan_layers=scan_layers, moe_dispatch=dispatch)
    model = init_model(cfg, seed=3)
    loss_ref, grads_ref = _loss_and_grads(model, _window(1))
    graphdef, state = nnx.split(model)
    remat_model = nnx.merge(nnx.graphdef(init_model(cfg.replace(remat=remat), seed=3)), state)
    loss, grads = _loss_and_grads(remat_model, _window(1))
    # Recomputation runs the same ops on the same inputs; XLA may fuse them differently, so a few ulps of the
    # largest gradient of each tensor.
    assert_close_f32(loss, loss_ref)
    assert_trees_close_f32(grads, grads_ref, atol_ulps=64)


def test_remat_policies_recompute_what_they_say():
    """`full` keeps no named intermediate and `minimal` keeps exactly the named ones, checked on the residuals
    jax.checkpoint saves for one layer."""
    from dsv3_jax.stack import rematerialised

    cfg = TINY.replace(moe_dispatch="capacity")
    model = init_model(cfg, seed=4)
    layer = nnx.split(model.moe_layers)
    graphdef, state = layer
    one = jax.tree.map(lambda a: a[0], state)
    h = jax.random.normal(jax.random.key(0), (2, 6, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))

    def body(s, h):
        out, aux = nnx.merge(graphdef, s)(h, positions)
        return out.sum() + aux.seq_balance_loss

    def saved_names(remat):
        f = rematerialised(body, remat, in_scan=False)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # the public API prints one line per saved residual
            jax.ad_checkpoint.print_saved_residuals(f, one, h)
        return set(out.getvalue().splitlines())

    full = saved_names("full")
    assert not any(name in src for src in full for name in MINIMAL_SAVED)
    minimal = saved_names("minimal")
    for name in MINIMAL_SAVED:
        if name.startswith("mlp_") and not cfg.n_shared_experts:
            continue
        assert any(f"named '{name}'" in src for src in minimal), (name, minimal)


def test_saved_configs_from_before_scan_layers_read_as_unrolled():
    """A run directory written before `model.scan_layers` existed holds unrolled checkpoints: its config.json
    (no such field) must load as scan_layers=false, so eval, generate and resume find the layout they saved."""
    from dsv3_jax.train.config import Config, saved_scan_layers
    from dsv3_jax.train.trainer import layout_problem

    legacy = Config().to_dict()
    del legacy["model"]["scan_layers"]
    assert saved_scan_layers(legacy) is False
    assert Config.from_dict(legacy).model.scan_layers is False
    assert Config.from_dict(Config().to_dict()).model.scan_layers is True
    problem = layout_problem(legacy, Config())
    assert "unrolled layers" in problem and "scanned layers" in problem
    assert "--set model.scan_layers=false" in problem
    assert layout_problem(legacy, Config.from_dict(legacy)) is None
