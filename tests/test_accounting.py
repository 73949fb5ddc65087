"""Parameter accounting: the V3 preset lands on the published 671B / 37B, small models count exactly."""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dsv3_jax import get_preset, init_model
from dsv3_jax.accounting import ParamCount, count_params, layer_templates
from dsv3_jax.moe import RouterBias


def test_v3_671b_and_37b_active():
    c = count_params(get_preset("deepseek-v3-671b"))
    assert c.main_total == pytest.approx(671e9, rel=0.002)  # paper: 671B total
    assert c.main_active == pytest.approx(37e9, rel=0.02)  # paper: 37B activated per token
    assert c.stored_total == pytest.approx(685e9, rel=0.002)  # HF hub: 685B with the MTP layer's copies
    assert c.total > c.main_total and c.active > c.main_active


def test_tiny_counts_match_allocated_params():
    cfg = get_preset("tiny")
    model = init_model(cfg)
    allocated = sum(math.prod(v[...].shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    c = count_params(cfg)
    assert c.total == allocated
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert * (cfg.n_moe_layers + cfg.mtp_depth)
    assert c.active == c.total - inactive
    assert c.embedding == 2 * cfg.vocab_size * cfg.hidden_size


# ---- templating: one traced layer per kind, counted once per layer ------------------------------------------
def _full_trace(cfg, scan_layers=False):
    """(params, router biases) of the whole model, every layer traced (unrolled: the slow, quadratic-in-depth
    way, with the per-layer paths the templates name; scanned: the stacked layout)."""
    return jax.eval_shape(lambda: nnx.split(init_model(cfg.replace(scan_layers=scan_layers)), nnx.Param,
                                            RouterBias)[1:])


def _leaves(state) -> list:
    return sorted((tuple(map(str, p)), tuple(x.shape), jnp.dtype(x.dtype).name) for p, x in nnx.to_flat_state(state))


def _reference_count(cfg, params) -> ParamCount:
    """count_params' definitions, tallied leaf by leaf over a full trace."""
    sizes = [(p, math.prod(x.shape)) for p, x in nnx.to_flat_state(params)]
    routed = lambda p: "experts" in p and "shared_experts" not in p  # noqa: E731
    total = sum(s for _, s in sizes)
    mtp_total = sum(s for p, s in sizes if p[0] == "mtp")
    all_routed = sum(s for p, s in sizes if routed(p))
    main_routed = sum(s for p, s in sizes if routed(p) and p[0] != "mtp")
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    assert all_routed % e == 0 and main_routed % e == 0  # every routed tensor has E rows: exact integers below
    embedding = sum(s for p, s in sizes if p[0] in ("embed_tokens", "lm_head"))
    return ParamCount(total=total, active=total - all_routed * (e - k) // e, main_total=total - mtp_total,
                      main_active=total - mtp_total - main_routed * (e - k) // e, embedding=embedding,
                      stored_total=total + cfg.mtp_depth * embedding)


@pytest.mark.parametrize("depth", range(1, 9))
def test_templated_count_equals_a_full_trace(depth):
    """Every dense prefix 0..depth (and MTP depths 0-2): the per-kind templates, expanded, are the full model's
    variables, and count_params equals a leaf-by-leaf tally of the fully traced model."""
    for dense in range(depth + 1):
        cfg = get_preset("tiny").replace(num_hidden_layers=depth, first_k_dense_replace=dense,
                                         num_nextn_predict_layers=(depth + dense) % 3)
        params, biases = _full_trace(cfg)
        for templates, state in zip(layer_templates(cfg), (params, biases)):
            expanded = sorted((tuple(map(str, p)), t.shape, t.dtype) for t in templates for p in t.paths())
            assert expanded == _leaves(state), (depth, dense)
        assert count_params(cfg) == _reference_count(cfg, params), (depth, dense)
        # the default scanned layout stores the same numbers in stacks
        assert count_params(cfg) == _reference_count(cfg, _full_trace(cfg, scan_layers=True)[0]), (depth, dense)


def _spy_on_model_builds(monkeypatch) -> list:
    """Record (num_hidden_layers, mtp_depth) of every model init_model builds from here on."""
    import dsv3_jax.model as model_module

    built, real = [], model_module.init_model

    def spy(cfg, *args, **kwargs):
        built.append((cfg.num_hidden_layers, cfg.mtp_depth))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(model_module, "init_model", spy)
    layer_templates.cache_clear()  # trace afresh, through the spy
    return built


def test_a_million_layers_count_in_constant_work(monkeypatch):
    """Work does not depend on the depth: the only model built has at most one layer of each kind and one MTP
    module, the templates are as many as for the 4-layer preset, and it takes well under a second (bound: 30 s)."""
    built = _spy_on_model_builds(monkeypatch)
    small = get_preset("small")
    deep = small.replace(num_hidden_layers=1_000_000)
    start = time.perf_counter()
    count = count_params(deep)
    assert time.perf_counter() - start < 30
    assert built == [(2, 1)]  # one dense + one MoE layer, one MTP module
    assert [len(t) for t in layer_templates(deep)] == [len(t) for t in layer_templates(small)]
    assert count.total > 1_000_000 * 3 * small.hidden_size * small.moe_intermediate_size * small.n_routed_experts


def test_counts_scale_exactly_linearly_in_moe_layers():
    """Each MoE layer adds the same parameters, exactly (integers, no float rounding), up to the largest depth
    the config allows (2**31 - 1); the increment is one MoE layer of a fully traced model."""
    small = get_preset("small")  # first_k_dense_replace=1
    counts = {n: count_params(small.replace(num_hidden_layers=n)) for n in (2, 3, 7, 1_000_000, 2**31 - 1)}
    step = {f.name: getattr(counts[3], f.name) - getattr(counts[2], f.name) for f in dataclasses.fields(ParamCount)}
    for n in (7, 1_000_000, 2**31 - 1):
        for name, per_layer in step.items():
            assert getattr(counts[n], name) == getattr(counts[2], name) + (n - 2) * per_layer, (n, name)
    params, _ = _full_trace(small.replace(num_hidden_layers=3))
    one_moe_layer = sum(math.prod(x.shape) for p, x in nnx.to_flat_state(params) if p[:2] == ("layers", 2))
    assert step["total"] == step["main_total"] == step["stored_total"] == one_moe_layer
    routed_per_layer = 3 * small.hidden_size * small.moe_intermediate_size
    inactive = (small.n_routed_experts - small.num_experts_per_tok) * routed_per_layer
    assert step["active"] == step["main_active"] == one_moe_layer - inactive
    assert step["embedding"] == 0
