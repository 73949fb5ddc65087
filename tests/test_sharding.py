"""Meshes, the logical-axis rule table and sharded training.

The 8-device checks run `tests/_mesh_equivalence.py` once in a subprocess (XLA_FLAGS must be set before JAX
starts) and assert on its JSON report: four (data, expert, tensor) meshes against one device, the three
dispatch strategies, expert placement, global expert counts, checkpoints restored onto other meshes and the
errors of impossible meshes. The rest runs in-process on one device or on abstract meshes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from dsv3_jax import cli, distributed, sharding
from dsv3_jax.config import ConfigError, get_preset
from dsv3_jax.model import init_model
from dsv3_jax.moe import RouterBias
from dsv3_jax.train.config import Config, TrainConfig, apply_overrides
from dsv3_jax.train.step import abstract_train_state
from dsv3_jax.train.trainer import config_differences

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


# ---- the rule table (abstract meshes: no devices needed) ---------------------------------------------------
@functools.lru_cache(maxsize=None)
def _abstract_params(preset: str, scan_layers: bool = True):
    cfg = get_preset(preset).replace(scan_layers=scan_layers)
    if preset == "deepseek-v3-671b":  # every kind of layer at full width, 4 of its 61 layers (tracing time)
        cfg = cfg.replace(num_hidden_layers=4)
    model = nnx.eval_shape(lambda: init_model(cfg))
    return nnx.split(model, nnx.Param, RouterBias)[1:]


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek-v3-671b"])
def test_rule_table_covers_every_parameter(preset, scan_layers):
    params, biases = _abstract_params(preset, scan_layers)
    for tree in (params, biases):  # every variable declares one logical axis per dimension where it is created
        for path, var in nnx.to_flat_state(tree):
            axes = sharding.logical_axes(var)
            assert axes is not None and len(axes) == var.ndim, (path, axes)
            assert all(a is None or a in sharding.LOGICAL_RULES for a in axes), (path, axes)
            assert (axes[0] == "layers") == (scan_layers and path[0] in ("dense_layers", "moe_layers")), path


def _specs(plan, tree):
    return {sharding.path_str(p): s.spec for p, s in
            zip([p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]],
                jax.tree.leaves(plan.shardings(tree)))}


class _Specs(dict):
    """Specs keyed by the unrolled layout's names; for a scanned model, `layers/0/...` reads `dense_layers/...`
    and `layers/3/...` reads `moe_layers/...` with the leading layer axis (never sharded) taken off."""

    def __init__(self, specs, scanned):
        super().__init__(specs)
        self.scanned = scanned

    def __getitem__(self, name):
        if not self.scanned or not name.startswith("layers/"):
            return super().__getitem__(name)
        _, index, rest = name.split("/", 2)
        spec = super().__getitem__(("dense_layers/" if index == "0" else "moe_layers/") + rest)
        assert len(spec) == 0 or spec[0] is None, (name, spec)
        return P(*spec[1:])


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_param_specs_on_the_671b_preset(scan_layers):
    params, biases = _abstract_params("deepseek-v3-671b", scan_layers)
    plan = sharding.MeshPlan(AbstractMesh((4, 8, 4), sharding.MESH_AXES), sharding.rules_for(fsdp=False))
    specs = _Specs(_specs(plan, params), scan_layers)
    assert specs["layers/3/mlp/experts/gate_proj"] == P("expert", None, "tensor")
    assert specs["layers/3/mlp/experts/down_proj"] == P("expert", "tensor")
    assert specs["layers/3/mlp/shared_experts/up_proj/kernel"] == P(None, "tensor")
    assert specs["layers/0/mlp/down_proj/kernel"] == P("tensor")
    assert specs["layers/0/self_attn/q_b_proj/kernel"] == P(None, "tensor")
    assert specs["layers/0/self_attn/kv_b_proj/kernel"] == P(None, "tensor")
    assert specs["layers/0/self_attn/o_proj/kernel"] == P("tensor")
    assert specs["layers/0/self_attn/kv_a_proj_with_mqa/kernel"] == P()
    assert specs["embed_tokens/embedding"] == P("tensor")
    assert specs["lm_head/kernel"] == P(None, "tensor")
    assert specs["layers/3/mlp/gate/kernel"] == P() and specs["norm/weight"] == P()
    assert set(_specs(plan, biases).values()) == {P()}  # router biases replicated
    assert plan.batch_sharding().spec == P(("data", "expert"))

    fsdp = sharding.MeshPlan(plan.mesh, sharding.rules_for(fsdp=True))
    specs = _Specs(_specs(fsdp, params), scan_layers)
    # fsdp: routed experts' hidden dim over data (their expert dim took `expert`), the rest over data x expert
    de = ("data", "expert")
    assert specs["layers/3/mlp/experts/gate_proj"] == P("expert", "data", "tensor")
    assert specs["embed_tokens/embedding"] == P("tensor", de)
    assert specs["layers/0/self_attn/o_proj/kernel"] == P("tensor", de)
    assert specs["layers/0/self_attn/q_b_proj/kernel"] == P(de, "tensor")
    assert specs["layers/0/self_attn/kv_a_proj_with_mqa/kernel"] == P(de)
    assert specs["norm/weight"] == P() and specs["layers/3/mlp/gate/kernel"] == P(de)


def test_size_one_axes_are_dropped_and_axes_used_once():
    plan = sharding.MeshPlan(AbstractMesh((8, 1, 1), sharding.MESH_AXES), sharding.rules_for(fsdp=True))
    assert plan.spec(("experts", "embed", "expert_mlp")) == P(None, "data")
    assert plan.spec(("batch", "length", "act_embed")) == P("data")
    assert plan.spec(("batch", "embed")) == P("data")  # "data" already holds the batch dim


def test_optimizer_state_follows_its_parameter():
    model_cfg, train_cfg = get_preset("tiny"), TrainConfig()
    plan = sharding.MeshPlan(AbstractMesh((2, 2, 2), sharding.MESH_AXES), sharding.rules_for(fsdp=False))
    _, abstract = abstract_train_state(model_cfg, train_cfg)
    shardings = plan.shardings(abstract)
    params = dict(zip([sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract.params)[0]],
                      jax.tree.leaves(shardings.params)))
    checked = 0
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0],
                               jax.tree.leaves(shardings.opt_state)):
        name = sharding.path_str(path)
        if leaf.ndim == 0:
            assert s.spec == P(), name  # Adam's step count
            continue
        owner = next(p for p in params if name.endswith("/" + p))
        assert s.spec == params[owner].spec, name
        checked += 1
    assert checked == 2 * len(params)  # mu and nu of every parameter
    assert shardings.step.spec == P() and set(s.spec for s in jax.tree.leaves(shardings.biases)) == {P()}


# ---- config and CLI ----------------------------------------------------------------------------------------
def test_mesh_config_overrides_and_validation():
    cfg = apply_overrides(Config(), ["mesh.expert=4", "mesh.tensor=2", "mesh.fsdp=true"])
    assert (cfg.mesh.data, cfg.mesh.expert, cfg.mesh.tensor, cfg.mesh.fsdp) == (-1, 4, 2, True)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict({k: v for k, v in cfg.to_dict().items() if k != "mesh"}).mesh == Config().mesh
    with pytest.raises(ConfigError, match="mesh.data"):
        apply_overrides(Config(), ["mesh.data=0"])
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        apply_overrides(Config(), ["mesh.expert=-1"])
    with pytest.raises(ConfigError, match="unknown field 'pipeline'"):
        apply_overrides(Config(), ["mesh.pipeline=2"])


def test_resume_ignores_the_mesh_section():
    a = Config().to_dict()
    b = apply_overrides(Config(), ["mesh.expert=8", "mesh.data=1"]).to_dict()
    assert config_differences(a, b) == []
    c = apply_overrides(Config(), ["mesh.expert=8", "train.steps=5"]).to_dict()
    assert config_differences(a, c) == ["train.steps: saved 1000, now 5"]
    # how a step is computed may change on resume; what it computes may not
    d = apply_overrides(Config(), ["model.remat=full", "train.grad_accum=2", "mesh.data=2"]).to_dict()
    assert config_differences(a, d) == []
    e = apply_overrides(Config(), ["model.scan_layers=false"]).to_dict()
    assert config_differences(a, e) == ["model.scan_layers: saved True, now False"]


def test_one_device_plan_is_trivial():
    plan = sharding.plan_from_config(apply_overrides(Config(model=get_preset("tiny")), ["train.batch_size=3"]))
    assert plan.mesh.shape == {"data": 1, "expert": 1, "tensor": 1}
    assert plan.process_batch_slice(3) == (0, 1)
    assert plan.batch_sharding().spec == P()


@pytest.mark.parametrize("overrides,message", [
    (["mesh.tensor=2"], "mesh.data: -1 cannot fill the mesh"),
    (["mesh.data=1", "mesh.expert=2"], "mesh: data*expert*tensor = 1*2*1 = 2, but there are 1 devices"),
])
def test_cli_rejects_an_impossible_mesh_before_data(tmp_path, capsys, overrides, message):
    # The corpus does not exist: the mesh error must come first (before data preparation or compilation).
    args = ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--corpus", "files:/nonexistent/*.txt"]
    for item in overrides:
        args += ["--set", item]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cluster_flags_are_checked_before_joining(capsys):
    with pytest.raises(ConfigError, match="--num-processes"):
        distributed.initialize("localhost:1234", None, 0)
    with pytest.raises(ConfigError, match="--process-id"):
        distributed.initialize("localhost:1234", 2, 2)
    with pytest.raises(ConfigError, match="--coordinator"):
        distributed.initialize("localhost", 2, 0)
    assert cli.main(["train", "--preset", "tiny", "--run-dir", "/nonexistent/run", "--coordinator", "h:1"]) == 2
    assert "--distributed" in capsys.readouterr().err


# ---- 8 fake devices ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mesh")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_mesh_equivalence.py"), str(out), str(tmp)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["2x2x2_fsdp", "1x8x1", "8x1x1", "1x2x4"])
def test_sharded_steps_match_one_device(report, mesh):
    """Two train steps (capacity dispatch, float32): metrics, Adam moments (i.e. the gradients), params, biases."""
    r = report["meshes"][mesh]
    assert r["metric_diff"] < TOL, r
    assert r["opt_diff"] < TOL, r
    assert r["param_diff"] < TOL, r
    assert r["bias_diff"] < TOL, r


def test_experts_are_split_over_the_expert_axis(report):
    for mesh, expert in (("2x2x2_fsdp", 2), ("1x8x1", 8), ("1x2x4", 2)):
        r = report["meshes"][mesh]
        n_experts = r["experts_shape"][0]
        # no device holds every expert's weights: each holds E / expert of them
        assert r["expert_shard_shape"][0] == n_experts // expert, r
        assert r["expert_addressable_shapes"] == [r["expert_shard_shape"]], r
        assert r["layer_axis_whole"], r
    tp, fsdp = report["meshes"]["1x2x4"], report["meshes"]["2x2x2_fsdp"]
    assert tp["expert_shard_shape"][2] == tp["experts_shape"][2] // 4  # expert hidden dim over tensor=4
    assert fsdp["expert_shard_shape"][1] == fsdp["experts_shape"][1] // 2  # hidden dim over data=2 (fsdp)
    # GSPMD turns the expert-sharded capacity dispatch into all-to-all
    assert report["meshes"]["1x8x1"]["hlo_all_to_all"], report["meshes"]["1x8x1"]["hlo_collectives"]


def test_sharded_init_is_the_one_device_init(report):
    assert report["sharded_init_diff"] == 0.0
    assert report["sharded_init_specs_match"]


def test_dispatch_strategies_agree_on_a_sharded_mesh(report):
    for dispatch in ("capacity", "dense", "blocked", "ragged"):
        r = report["dispatch"][dispatch]
        assert r["loss_diff"] < TOL and r["counts_diff"] == 0.0, (dispatch, r)


def test_ragged_dispatch_trains_like_one_device(report):
    """Expert-parallel ragged_dot (shard_map + all-to-all) on data x expert x tensor (fsdp) and pure expert
    meshes: two train steps give the one-device parameters, biases and metrics."""
    for name, r in report["ragged_train"].items():
        assert r["param_diff"] < TOL and r["bias_diff"] < TOL and r["metric_diff"] < TOL, (name, r)
        assert r["hlo_all_to_all"], name


def test_grad_accumulation_on_a_mesh_equals_the_whole_batch(report):
    """train.grad_accum=2 on the 2x2x2 fsdp mesh: two steps equal the one-device, one-piece steps."""
    r = report["grad_accum"]
    assert r["param_diff"] < TOL and r["bias_diff"] < TOL and r["metric_diff"] < TOL, r


def test_expert_counts_are_global(report):
    """Under jit + GSPMD the per-expert counts summed over a data-sharded batch cover the whole batch."""
    c = report["counts"]
    assert c["sharded_sum"] == [c["expected_sum"]] * len(c["sharded_sum"])
    assert c["diff_vs_1dev"] == 0.0 and c["loss_diff_vs_1dev"] < TOL


def test_checkpoint_restores_onto_other_meshes(report):
    """Saved on 8x1x1, restored on 1x8x1 and on one device: the same continued metrics."""
    for target in ("1x8x1", "1dev"):
        r = report["checkpoint"]["restored"][target]
        assert r["step"] == 1 and r["data_state_ok"] and r["expert_sharding_matches"], r
        assert r["max_metric_diff"] < TOL, r


def test_impossible_meshes_name_the_axis_and_dimension(report):
    e = report["errors"]
    assert e["product"].startswith("mesh: data*expert*tensor = 3*1*1 = 3, but there are 8 devices")
    assert e["fill"].startswith("mesh.data: -1 cannot fill")
    assert e["heads"] == "mesh.tensor: tensor=4 does not divide model.num_attention_heads=2"
    assert e["experts"] == "mesh.expert: expert=8 does not divide model.n_routed_experts=12"
    assert e["vocab"] == "mesh.tensor: tensor=4 does not divide model.vocab_size=130"
    assert e["batch"] == "mesh.data: data*expert = 8*1 = 8 does not divide train.batch_size=4"
    assert e["fsdp"].startswith("mesh.data: data=8 does not divide model.hidden_size")
