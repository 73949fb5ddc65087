"""Every bad config value is a ConfigError naming its field (and file), never a TypeError or JSON traceback."""

import dataclasses
import json
import re

import pytest

from dsv3_jax.config import PRESETS, ConfigError, ModelConfig, YarnConfig, get_preset
from dsv3_jax.config_fields import check_field_types
from dsv3_jax.train.config import Config, MeshConfig, TrainConfig, apply_overrides
from dsv3_jax.train.presets import TRAIN_PRESETS
from dsv3_jax.hf_config import from_hf, to_hf

TINY = PRESETS["tiny"]


# ---- valid configs stay valid ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_as_run_configs(name):
    config = Config(model=get_preset(name), train=TRAIN_PRESETS[name]).validate()
    assert Config.from_dict(json.loads(config.to_json())) == config


def test_default_config_round_trips():
    assert Config().validate() == Config.from_dict(Config().to_dict())


def test_tiny_preset_fits_the_byte_level_tokenizer():
    from dsv3_jax.data.tokenizer import MIN_VOCAB_SIZE

    assert get_preset("tiny").vocab_size >= MIN_VOCAB_SIZE  # `train --preset tiny` builds its own BPE


def test_valid_overrides_keep_working():
    config = apply_overrides(Config(), ["model.rope_scaling=null", "data.corpus=files:*.txt", "model.dtype=bfloat16",
                                        "train.peak_lr=1", "data.cache_dir=2024", 'data.corpus="a b"'])
    assert config.model.rope_scaling is None and config.model.dtype == "bfloat16"
    assert config.data.corpus == "a b" and config.data.cache_dir == "2024"
    assert config.train.peak_lr == 1.0 and isinstance(config.train.peak_lr, float)
    config = apply_overrides(config, ['model.rope_scaling={"factor": 4}', "train.balance_alpha=0"])
    assert config.model.rope_scaling == YarnConfig(factor=4.0) and config.train.balance_alpha == 0.0
    assert apply_overrides(config, ["model.rope_scaling.beta_fast=16"]).model.rope_scaling.beta_fast == 16.0


# ---- generic type checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("section, field, value, message", [
    (ModelConfig, "hidden_size", True, "hidden_size: must be an integer, got True"),
    (ModelConfig, "hidden_size", "32", "hidden_size: must be an integer, got '32'"),
    (ModelConfig, "rms_norm_eps", float("nan"), "rms_norm_eps: must be a finite number, got nan"),
    (ModelConfig, "rope_theta", float("inf"), "rope_theta: must be a finite number, got inf"),
    (ModelConfig, "rope_theta", 10 ** 400, "rope_theta: must be a finite number"),
    (ModelConfig, "capacity_factor", "1.5", "capacity_factor: must be a number, got '1.5'"),
    (ModelConfig, "dtype", None, "dtype: must be a string, got None"),
    (ModelConfig, "fp8_power_of_2_scales", 1, "fp8_power_of_2_scales: must be true or false, got 1"),
    (ModelConfig, "rope_scaling", {"factor": 4},
     "rope_scaling: must be an object of YarnConfig fields, got {'factor': 4}"),
    (ModelConfig, "rope_scaling", YarnConfig(beta_slow=float("-inf")), "rope_scaling.beta_slow: must be a finite"),
    (TrainConfig, "peak_lr", float("inf"), "train.peak_lr: must be a finite number, got inf"),
    (TrainConfig, "eval_batches", False, "train.eval_batches: must be an integer, got False"),
    (TrainConfig, "balance_alpha", float("nan"), "train.balance_alpha: must be a finite number, got nan"),
    (MeshConfig, "data", 2.0, "mesh.data: must be an integer, got 2.0"),
])
def test_each_section_checks_its_types(section, field, value, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        dataclasses.replace(section(), **{field: value}).validate()


def test_run_config_names_fields_from_the_root():
    with pytest.raises(ConfigError, match=r"^model\.rope_scaling\.factor: must be a finite number, got nan"):
        Config(model=TINY.replace(rope_scaling=YarnConfig(factor=float("nan")))).validate()
    with pytest.raises(ConfigError, match=r"^model\.topk_group: 9 exceeds n_group=4") as err:
        Config(model=TINY.replace(topk_group=9)).validate()
    assert err.value.field == "model.topk_group"
    with pytest.raises(ConfigError, match=r"^data\.vocab_size: must be an integer, got '512'"):
        Config(model=TINY, data=dataclasses.replace(Config().data, vocab_size="512")).validate()


def test_an_unknown_type_hint_is_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        sizes: tuple = ()

    with pytest.raises(TypeError, match="does not know the type"):
        check_field_types(Odd())


# ---- --set overrides ------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.peak_lr=Infinity", "train.peak_lr: must be a finite number, got inf"),
    ("train.peak_lr=-Infinity", "train.peak_lr: must be a finite number, got -inf"),
    ("train.peak_lr=NaN", "train.peak_lr: must be a finite number, got nan"),
    ("train.peak_lr=1e400", "train.peak_lr: must be a finite number, got inf"),
    ("train.peak_lr=1e-3,", "train.peak_lr: must be a number, got '1e-3,'"),
    ("train.warmup_frac=abc", "train.warmup_frac: must be a number, got 'abc'"),
    ("train.steps=true", "train.steps: must be an integer, got True"),
    ("train.steps=2.5", "train.steps: must be an integer, got 2.5"),
    ("train.steps=null", "train.steps: must be an integer, got None"),
    ("model.norm_topk_prob=yes", "model.norm_topk_prob: must be true or false, got 'yes'"),
    ("mesh.fsdp=1", "mesh.fsdp: must be true or false, got 1"),
    ("data.vocab_size=abc", "data.vocab_size: must be an integer, got 'abc'"),
    ("model.rope_scaling.factor=NaN", "model.rope_scaling.factor: must be a finite number, got nan"),
    ('model.rope_scaling={"factor": 4,}', "model.rope_scaling: not valid JSON: Expecting property name"),
    ('model.rope_scaling={"bogus": 1}', "model.rope_scaling.bogus: unknown field 'bogus' in YarnConfig"),
    ('model.rope_scaling={"factor": "4"}', "model.rope_scaling.factor: must be a number, got '4'"),
    ("model.rope_scaling=5", "model.rope_scaling: must be an object of YarnConfig fields, got 5"),
    ("model=[]", "model: must be an object of ModelConfig fields, got []"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        apply_overrides(Config(model=TINY), [override])


# ---- Config.from_dict / Config.load (a run's config.json, maybe edited by hand) ---------------------------
def _saved(**edits):
    d = json.loads(Config(model=TINY).to_json())
    for path, value in edits.items():
        section, _, field = path.partition("__")
        if field:
            d[section][field] = value
        else:
            d[section] = value
    return d


@pytest.mark.parametrize("edits, message", [
    (dict(train__stepz=3), "train.stepz: unknown field 'stepz' in TrainConfig"),
    (dict(extra={}), "extra: unknown field 'extra' in Config"),
    (dict(train__peak_lr="1e-3"), "train.peak_lr: must be a number, got '1e-3'"),
    (dict(train__peak_lr=float("inf")), "train.peak_lr: must be a finite number, got inf"),
    (dict(model__vocab_size=None), "model.vocab_size: must be an integer, got None"),
    (dict(model__rope_scaling={"zzz": 1}), "model.rope_scaling.zzz: unknown field 'zzz' in YarnConfig"),
    (dict(model__rope_scaling=[4.0]), "model.rope_scaling: must be an object of YarnConfig fields"),
    (dict(train=[1]), "train: must be an object of TrainConfig fields, got [1]"),
    (dict(mesh=None), "mesh: must be an object of MeshConfig fields, got None"),
    (dict(model__topk_group=9), "model.topk_group: 9 exceeds n_group=4"),
])
def test_from_dict_names_the_field(edits, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        Config.from_dict(_saved(**edits))


def test_from_dict_rejects_a_non_object():
    with pytest.raises(ConfigError, match=r"^config: must be an object of Config fields, got \[1, 2\]"):
        Config.from_dict([1, 2])


def test_from_dict_fills_missing_fields_and_takes_int_floats():
    d = _saved(train__peak_lr=1)
    del d["mesh"], d["train"]["steps"]
    config = Config.from_dict(d)
    assert config.mesh == MeshConfig() and config.train.steps == TrainConfig().steps
    assert config.train.peak_lr == 1.0 and isinstance(config.train.peak_lr, float)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_saved(train__peak_lr="fast")))
    with pytest.raises(ConfigError, match=r"^train\.peak_lr: must be a number, got 'fast' \(in .*config\.json\)"):
        Config.load(path)
    path.write_text('{"train": {"steps": 3,}}')
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON: .* at line 1 column 23"):
        Config.load(path)
    path.write_text(Config(model=TINY).to_json())
    assert Config.load(path) == Config(model=TINY)


# ---- hf_config.from_hf --------------------------------------------------------------------------------------
def _write(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    return str(tmp_path / "config.json")


def test_from_hf_rejects_a_file_that_is_not_a_json_object(tmp_path):
    path = _write(tmp_path, "[1,2,3]")
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: must hold a JSON object .* got list"):
        from_hf(tmp_path)
    path = _write(tmp_path, '{"hidden_size": 32,}')
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: invalid JSON: .* at line 1 column 20"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=f"^{re.escape(path)}: not UTF-8 text"):
        from_hf(path)


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size="32"), "hidden_size: must be an integer, got '32'"),
    (dict(norm_topk_prob="true"), "norm_topk_prob: must be true or false, got 'true'"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps: must be a finite number, got nan"),
    (dict(rope_theta=float("inf")), "rope_theta: must be a finite number, got inf"),
    (dict(rope_scaling=[1]), "rope_scaling: must be an object or null, got [1]"),
    (dict(rope_scaling={"type": "yarn", "factor": "4"}), "rope_scaling.factor: must be a number, got '4'"),
    (dict(rope_scaling={"type": "yarn", "factor": None, "original_max_position_embeddings": 0}),
     "rope_scaling.original_max_position_embeddings: must be an integer >= 1, got 0"),
    (dict(rope_scaling={"type": "yarn", "beta_fast": float("-inf")}), "rope_scaling.beta_fast: must be a finite"),
])
def test_from_hf_names_the_field_and_the_file(tmp_path, changes, message):
    path = _write(tmp_path, json.dumps({**to_hf(TINY), **changes}))
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}.*\\(in {re.escape(path)}\\)"):
        from_hf(tmp_path)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):  # a dict source has no file to name
        from_hf({**to_hf(TINY), **changes})


def test_from_hf_takes_int_valued_floats(tmp_path):
    hf = {**to_hf(TINY), "rope_theta": 10000, "rms_norm_eps": 0}
    with pytest.raises(ConfigError, match="^rms_norm_eps: must be a positive number"):
        from_hf(hf)
    cfg = from_hf({**hf, "rms_norm_eps": 1e-6})
    assert cfg.rope_theta == 10000.0 and isinstance(cfg.rope_theta, float)
