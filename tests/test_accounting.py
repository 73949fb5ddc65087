"""Parameter accounting: the V3 preset lands on the published 671B / 37B, small models count exactly."""

import math

import pytest
from flax import nnx

from dsv3_jax import get_preset, init_model
from dsv3_jax.accounting import count_params


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
