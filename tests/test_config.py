"""ModelConfig: every validation rule names its field; HF config.json round trips; presets are valid."""

import json

import pytest

from dsv3_jax.config import PRESETS, ConfigError, ModelConfig, YarnConfig, get_preset
from dsv3_jax.hf_config import from_hf, to_hf

TINY = PRESETS["tiny"]

# (field named in the error, overrides that break it)
INVALID = [
    ("topk_group", dict(n_group=4, topk_group=5)),
    ("n_routed_experts", dict(n_routed_experts=10, n_group=4)),
    ("num_experts_per_tok", dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3)),
    ("n_group", dict(n_routed_experts=4, n_group=4, topk_group=2, num_experts_per_tok=2)),
    ("hidden_size", dict(hidden_size=-8)),
    ("kv_lora_rank", dict(kv_lora_rank=0)),
    ("v_head_dim", dict(v_head_dim=2.5)),
    ("q_lora_rank", dict(q_lora_rank=0)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=5)),
    ("first_k_dense_replace", dict(first_k_dense_replace=4)),
    ("first_k_dense_replace", dict(first_k_dense_replace=-1)),
    ("num_nextn_predict_layers", dict(num_nextn_predict_layers=-1)),
    ("n_shared_experts", dict(n_shared_experts=-1)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0.0)),
    ("rms_norm_eps", dict(rms_norm_eps=-1e-6)),
    ("rope_theta", dict(rope_theta=0)),
    ("init_std", dict(init_std=0)),
    ("norm_topk_prob", dict(norm_topk_prob="yes")),
    ("dtype", dict(dtype="float8")),
    ("param_dtype", dict(param_dtype="int8")),
    ("moe_dispatch", dict(moe_dispatch="magic")),
    ("capacity_factor", dict(capacity_factor=0.0)),
    ("attention_chunk", dict(attention_chunk=0)),
    ("attention_chunk", dict(attention_chunk=2.5)),
    ("grouped_gemm", dict(grouped_gemm="cutlass")),
    ("rope_scaling.factor", dict(rope_scaling=YarnConfig(factor=0.5))),
    ("rope_scaling.beta_fast", dict(rope_scaling=YarnConfig(beta_fast=1.0, beta_slow=2.0))),
    ("rope_scaling.original_max_position_embeddings", dict(rope_scaling=YarnConfig(original_max_position_embeddings=0))),
    ("vocab_size", dict(vocab_size=True)),
    ("num_attention_heads", dict(num_attention_heads=0)),
]


@pytest.mark.parametrize("field,overrides", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_validate_names_the_field(field, overrides):
    with pytest.raises(ConfigError) as err:
        TINY.replace(**overrides).validate()
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    assert get_preset(name).validate() is not None


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("gpt-5")


def test_small_preset_matches_spec():
    c = get_preset("small")
    assert (c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace, c.n_routed_experts) == (256, 4, 1, 16)
    assert (c.num_experts_per_tok, c.n_shared_experts, c.n_group, c.topk_group) == (4, 1, 4, 2)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (96, 64, 32, 16, 32)
    assert (c.num_attention_heads, c.vocab_size) == (4, 8192)


def test_v3_preset_dims():
    c = get_preset("deepseek-v3-671b")
    assert c.kv_cache_dim == 576 and c.qk_head_dim == 192 and c.n_moe_layers == 58


def test_hf_round_trip(tmp_path):
    for cfg in (TINY, get_preset("deepseek-v3-671b"), TINY.replace(q_lora_rank=None, rope_scaling=None)):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(to_hf(cfg)))
        back = from_hf(tmp_path, dtype=cfg.dtype)
        assert back == cfg


def test_from_hf_reads_hf5_rope_parameters_and_missing_mscale():
    hf = to_hf(TINY)
    del hf["rope_scaling"], hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                             "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2}
    cfg = from_hf(hf)
    assert cfg.rope_theta == 5000.0
    # HF treats absent mscales as 0 (no softmax m^2, cos/sin scaled by 0.1 ln f + 1): keep that meaning.
    assert cfg.rope_scaling == YarnConfig(factor=8.0, original_max_position_embeddings=32, beta_fast=16.0,
                                          beta_slow=2.0, mscale=0.0, mscale_all_dim=0.0)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert from_hf(hf).rope_scaling is None


def test_from_hf_rejects_unsupported(tmp_path):
    with pytest.raises(ConfigError, match="scoring_func"):
        from_hf({**to_hf(TINY), "scoring_func": "softmax"})
    with pytest.raises(ConfigError, match="rope_interleave"):
        from_hf({**to_hf(TINY), "rope_interleave": False})
    with pytest.raises(ConfigError, match="topk_group"):
        from_hf({**to_hf(TINY), "topk_group": 9})
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)


def test_mtp_alias():
    hf = to_hf(TINY)
    del hf["num_nextn_predict_layers"]
    hf["num_mtp_layers"] = 2
    assert from_hf(hf).mtp_depth == 2


def test_auto_is_the_default_of_every_per_backend_field():
    assert ModelConfig().moe_dispatch == "auto"
