"""AOT compilation for TPU slices (dsv3_jax/aot.py, `python -m dsv3_jax compile`).

Target parsing, HLO collective counting and the CLI's errors run everywhere. The compile test needs libtpu
(`pip install -r requirements-tpu.txt`) and is skipped without it; with it, the tiny preset's sharded train
step of the small preset compiles for a 4-chip v5p slice and its memory matches a hand-written
lower().compile() and `plan`.
"""

from __future__ import annotations

import importlib.util

import pytest

from dsv3_jax import cli
from dsv3_jax.aot import Target, parse_target
from dsv3_jax.config import ConfigError

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_parse_target():
    assert parse_target("v5p:2x2x1") == Target("v5p:2x2x1", "tpu", "v5p", 4, 95)
    assert parse_target("v5e:4x4").chips == 16 and parse_target("v5e:4x4").hbm_gib == 16
    assert parse_target("v5p:8x8x8").chips == 512
    assert parse_target("h100:8") == Target("h100:8", "gpu", "h100", 8, 80, nodes=1)
    assert parse_target("h200:8x4") == Target("h200:8x4", "gpu", "h200", 32, 141, nodes=4)
    for bad in ("v5p", "v5p:", "v5p:2x", "v9:2x2", "2x2x1", "v5p:axb", "a100:8", "h100:", "h100:2x2x2"):
        with pytest.raises(ConfigError, match="--target: .* is not a TPU topology"):
            parse_target(bad)
    for bad in ("h100:16", "h100:0", "h100:8x0"):
        with pytest.raises(ConfigError, match="a node holds 1 to 8 GPUs"):
            parse_target(bad)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_rejects_a_bad_target_in_one_line(capsys):
    assert cli.main(["compile", "--target", "h100:9"]) == 2
    assert "--target: 'h100:9': a node holds 1 to 8 GPUs" in _one_error_line(capsys)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here, so the install hint never shows")
def test_cli_without_libtpu_says_how_to_install(capsys):
    assert cli.main(["compile", "--target", "v5p:2x2x1", "--preset", "tiny"]) == 2
    assert "pip install -r requirements-tpu.txt" in _one_error_line(capsys)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -r requirements-tpu.txt)")
def test_small_step_compiles_for_a_v5p_slice_and_matches_a_hand_written_compile():
    import jax
    import jax.numpy as jnp

    from dsv3_jax import sharding
    from dsv3_jax.aot import compile_train_step, target_devices
    from dsv3_jax.config import get_preset
    from dsv3_jax.train.config import Config, apply_overrides
    from dsv3_jax.train.presets import train_preset
    from dsv3_jax.train.step import abstract_train_state, jit_train_step, state_shardings

    # the small preset (TPU tiles pad the tiny preset's 32-wide tensors far beyond their size, which no byte
    # formula over logical shapes can follow), at a short sequence to keep the compile near a minute
    config = apply_overrides(Config(model=get_preset("small"), train=train_preset("small")),
                             ["mesh.expert=4", "model.moe_dispatch=ragged", "train.batch_size=8"])
    target = parse_target("v5p:2x2x1")
    report = compile_train_step(config, target)
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "expert": 4, "tensor": 1}
    assert report["fits"] and report["collectives"].get("ragged-all-to-all", {}).get("count", 0) > 0
    # the same numbers from a lower().compile() written out by hand
    plan = sharding.plan_for(1, 4, 1, devices=target_devices(target))
    graphdef, abstract = abstract_train_state(config.model, config.train, plan)
    window = jax.ShapeDtypeStruct((8, config.train.seq_len + 1 + config.model.mtp_depth), jnp.int32,
                                  sharding=plan.batch_sharding())
    mem = jit_train_step(graphdef, config.model, config.train, plan, state_shardings(plan, abstract)).lower(
        abstract, window).compile().memory_analysis()
    assert report["hbm_gib"]["temporaries"] == pytest.approx(mem.temp_size_in_bytes / 2**30, abs=1e-3)
    assert report["hbm_gib"]["arguments"] == pytest.approx(mem.argument_size_in_bytes / 2**30, abs=1e-3)
    assert 0.75 < report["plan_gib"]["total"] / report["hbm_gib"]["total"] < 1.35


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -r requirements-tpu.txt)")
def test_a_step_that_does_not_fit_is_a_result_not_a_crash(capsys):
    """The 671B preset (61 scanned layers) on a v5p-1024 slice: XLA's out-of-memory verdict comes back as
    fits=false with the temporaries it needed (seconds of compilation: the scan keeps it small)."""
    args = ["compile", "--target", "v5p:8x8x8", "--preset", "deepseek-v3-671b", "--set", "mesh.data=8",
            "--set", "mesh.expert=64", "--set", "mesh.fsdp=true", "--set", "model.remat=full",
            "--set", "model.capacity_factor=1.25", "--set", "train.batch_size=512", "--json"]
    assert cli.main(args) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["hbm_gib"]["temporaries"] > report["hbm_gib"]["available"] > 90
    assert report["devices"] == 512 and report["mesh"] == {"data": 8, "expert": 64, "tensor": 1}


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -r requirements-tpu.txt)")
def test_a_mesh_the_torus_cannot_hold_is_one_error_line(capsys):
    args = ["compile", "--target", "v5p:8x16x16", "--preset", "tiny", "--set", "mesh.data=32",
            "--set", "mesh.expert=64", "--set", "train.batch_size=2048"]
    assert cli.main(args) == 2
    assert "cannot be laid out on the devices' physical mesh [8, 16, 16]" in capsys.readouterr().err
