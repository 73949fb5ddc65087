"""Run-level sharding: building the mesh, checking a model and batch against it, and the run's MeshPlan.

The mesh has three axes, ("data", "expert", "tensor"). The rule table, `MeshPlan` and `constrain` live in the
leaf module `dsv3_jax.partitioning` (layers import only that); this module sits above the model, which it
traces to check every parameter against the mesh, and re-exports the partitioning names for callers.

Mesh axes are `AxisType.Auto`: jit + GSPMD propagates shardings from the annotated inputs and parameters
through the unannotated model code (argsort / bincount / scatter in the MoE dispatch included). `Explicit`
axes would make every such op demand an explicit output sharding (sharding-in-types), i.e. annotations in
every layer, for the same compiled program.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.accounting import layer_templates
from dsv3_jax.fp8 import RECIPES
from dsv3_jax.model import init_model
from dsv3_jax.moe import RouterBias
from dsv3_jax.partitioning import (BATCH_AXES, FSDP_RULES, LOGICAL_RULES, MESH_AXES, MeshFunction, MeshPlan,
                                   active_plan, check_divisibility, constrain, logical_axes, path_str,
                                   resolve_mesh_shape, rules_for, use_plan)

__all__ = ["BATCH_AXES", "FSDP_RULES", "LOGICAL_RULES", "MESH_AXES", "MeshFunction", "MeshPlan", "active_plan",
           "check_divisibility", "check_model_fits", "constrain", "describe", "logical_axes", "make_mesh",
           "path_str", "plan_for", "plan_from_config", "resolve_mesh_shape", "rules_for", "use_plan"]


def make_mesh(data: int = -1, expert: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "expert", "tensor") mesh over `devices` (default: all), Auto axes for jit + GSPMD."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, expert, tensor, len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except NotImplementedError as err:  # a TPU slice's torus: each mesh axis must be a product of physical axes
        physical = re.search(r"mesh \[([0-9, ]+)\]", str(err))
        raise ConfigError("mesh", f"data*expert*tensor = {shape[0]}*{shape[1]}*{shape[2]} cannot be laid out on "
                          f"the devices' physical mesh [{physical.group(1) if physical else '?'}]: each mesh axis "
                          "must be a product of some of its axes") from None


def plan_for(data: int = -1, expert: int = 1, tensor: int = 1, fsdp: bool = False,
             devices: Sequence[Any] | None = None) -> MeshPlan:
    """make_mesh + rules_for in one call."""
    return MeshPlan(make_mesh(data, expert, tensor, devices), rules_for(fsdp))


def check_model_fits(plan: MeshPlan, model_cfg: ModelConfig, batch_size: int | None = None,
                     every_param: bool = True, grad_accum: int = 1) -> None:
    """Named ConfigErrors (before anything compiles) when a mesh axis does not divide what it splits.

    `every_param` also checks every parameter's shape (nnx.eval_shape of the model: ~20 s of tracing for
    the 671B preset, so callers that build the abstract state anyway check that instead).
    """
    check_divisibility(model_cfg, dict(plan.mesh.shape), bool(plan.rules.get("embed")), batch_size, grad_accum)
    check_mesh_tiling(model_cfg, plan)  # FP8 tiles and blocks must not straddle shards
    if not every_param:
        return
    # Catch-all over every parameter (e.g. ones added later) without allocating anything.
    model = nnx.eval_shape(lambda: init_model(model_cfg))
    _, params, biases = nnx.split(model, nnx.Param, RouterBias)
    plan.check_divisible(params)
    plan.check_divisible(biases, "router bias")


# The model field that sets each logical axis's size, for errors.
AXIS_FIELDS = {"embed": "model.hidden_size", "q_lora": "model.q_lora_rank", "kv_lora": "model.kv_lora_rank",
               "heads": "model.num_attention_heads", "mlp": "model.intermediate_size",
               "expert_mlp": "model.moe_intermediate_size"}


def check_mesh_tiling(cfg: ModelConfig, plan: MeshPlan) -> None:
    """ConfigError naming the model field when a mesh split would cut an FP8 tile or block in two.

    Scales are per `tile` elements along each GEMM dim (the last two of every weight marked `quantised`); if a
    mesh axis splits such a dim, every shard must hold whole tiles, or one tile's max-abs would need values
    from two devices. Dims the mesh does not divide at all are reported by the divisibility checks."""
    if cfg.fp8 == "none":
        return
    tile = RECIPES[cfg.fp8].tile
    for leaf in layer_templates(cfg)[0]:
        if not leaf.quantised:
            continue
        spec = list(plan.spec(leaf.axes)) + [None] * len(leaf.shape)
        for dim in (len(leaf.shape) - 2, len(leaf.shape) - 1):
            (axes, shards), size = plan.split_of(spec[dim]), leaf.shape[dim]
            if shards > 1 and size % shards == 0 and (size // shards) % tile:
                which = "contraction (K)" if dim == len(leaf.shape) - 2 else "output (N)"
                raise ConfigError(AXIS_FIELDS[leaf.axes[dim]], f"model.fp8={cfg.fp8} quantises in {tile}-wide "
                                  f"tiles, but mesh {'*'.join(axes)}={shards} splits the {which} dim of "
                                  f"{path_str(leaf.path)} ({size}) into "
                                  f"{size // shards}-wide shards, so tiles would straddle devices; make "
                                  f"{size}/{shards} a multiple of {tile}, use a smaller mesh axis, or fp8=none")


def plan_from_config(config: Any, devices: Sequence[Any] | None = None, every_param: bool = True) -> MeshPlan:
    """The run's MeshPlan from `config.mesh`, checked against the devices, model and batch (ConfigError)."""
    mesh_cfg = config.mesh.validate()
    devices = list(jax.devices() if devices is None else devices)
    plan = plan_for(mesh_cfg.data, mesh_cfg.expert, mesh_cfg.tensor, mesh_cfg.fsdp, devices)
    check_model_fits(plan, config.model, config.train.batch_size, every_param, config.train.grad_accum)
    return plan


def describe(plan: MeshPlan) -> str:
    """'mesh data=2 expert=2 tensor=2 (fsdp) over 8 devices, 2 processes' for logs."""
    shape = " ".join(f"{a}={n}" for a, n in plan.mesh.shape.items())
    fsdp = " (fsdp)" if plan.rules.get("embed") else ""
    procs = len({d.process_index for d in plan.mesh.devices.flat})
    return f"mesh {shape}{fsdp} over {plan.mesh.devices.size} devices, {procs} process{'es' if procs > 1 else ''}"
