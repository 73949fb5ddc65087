"""Exact parity with HF transformers 5.24 `DeepseekV3ForCausalLM` on the committed random fixtures
(tests/fixtures/README.md): logits, every layer's residual stream, every routing decision and the MTP head.

The fixtures were drawn so that every routing decision wins by >= 1e-3, so expert choices must match exactly.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import convert
from tolerances import assert_close_f32

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ["qlora_groups", "directq_yarn", "yarn_mscale", "fp8_blocks"]
# Two float32 implementations (transformers' PyTorch eager kernels when the fixtures were made, XLA here) of 3
# layers and the MTP block: every reduction (widths up to 192) runs in its own order, a few ulps of its terms
# (about the values' magnitude) per stage. Hidden states and logits: 64 ulps of the tensor's max |value|
# (measured up to 14). Router weights are sigmoids of gate logits of those hidden states: 32 ulps of their max
# (measured 5.6). A wrong rope, norm, scale or expert choice is off by O(0.1) or more.
HF_ULPS = 64
ROUTER_ULPS = 32


def _run(name: str, dispatch: str, scan_layers: bool = True):
    cfg, model = convert.from_hf(FIXTURES / name, dtype=jnp.float32, moe_dispatch=dispatch, scan_layers=scan_layers)
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    graphdef, state = nnx.split(model)
    logits, aux = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids, return_hidden=True))(
        state, jnp.asarray(ref["input_ids"]))
    return cfg, ref, logits, aux


def _sorted_routes(idx, weight):
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(weight, order, -1)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("dispatch", ["capacity", "dense"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_hf_reference(name, dispatch, scan_layers):
    cfg, ref, logits, aux = _run(name, dispatch, scan_layers)
    assert_close_f32(logits, ref["logits"], rtol_ulps=0, atol_ulps=HF_ULPS)
    for i, (ours, theirs) in enumerate(zip(aux.layer_outputs, ref["layer_outputs"])):
        assert_close_f32(ours, theirs, atol_ulps=HF_ULPS, err_msg=f"layer {i}")
    assert_close_f32(aux.final_hidden, ref["final_hidden"], atol_ulps=HF_ULPS)

    assert aux.n_moe == ref["router_topk_idx"].shape[0]
    for i in range(aux.n_moe):
        layer = aux.moe_layer(i)
        idx, weight = _sorted_routes(np.asarray(layer.topk_idx), np.asarray(layer.topk_weight))
        np.testing.assert_array_equal(idx, ref["router_topk_idx"][i], err_msg=f"MoE layer {i} experts")
        assert_close_f32(weight, ref["router_topk_weight"][i], atol_ulps=ROUTER_ULPS, err_msg=f"MoE layer {i} weights")

    assert cfg.mtp_depth == 1
    assert_close_f32(aux.mtp_logits[0], ref["mtp_logits"], rtol_ulps=0, atol_ulps=HF_ULPS)
    idx, weight = _sorted_routes(np.asarray(aux.mtp_moe[0].topk_idx), np.asarray(aux.mtp_moe[0].topk_weight))
    np.testing.assert_array_equal(idx, ref["mtp_router_topk_idx"])
    assert_close_f32(weight, ref["mtp_router_topk_weight"], atol_ulps=ROUTER_ULPS)


def _route_mismatches(name: str, mutate) -> int:
    cfg, model = convert.from_hf(FIXTURES / name, dtype=jnp.float32)
    model = mutate(cfg, model)
    ref = np.load(FIXTURES / name / "reference.npz")
    _, aux = model(jnp.asarray(ref["input_ids"]))
    return int((np.sort(np.asarray(aux.moe.topk_idx), -1) != ref["router_topk_idx"]).any(-1).sum())


def test_fixtures_exercise_bias_and_group_limit():
    """Mutation guard: a router that ignored the bias or the group limit would fail the parity test."""

    def zero_bias(cfg, model):
        for router in model.routers():
            router.bias[...] = jnp.zeros_like(router.bias[...])
        return model

    def no_group_limit(cfg, model):
        for router in model.routers():
            router.cfg = cfg.replace(n_group=1, topk_group=1)
        return model

    assert _route_mismatches("qlora_groups", zero_bias) > 0
    assert _route_mismatches("qlora_groups", no_group_limit) > 0
