"""Mesh construction and the logical-axis rule table: PartitionSpecs for params, optimizer state and batches.

The mesh has three axes, ("data", "expert", "tensor"). Every array dimension we shard has a *logical* name
(batch, embed, heads, vocab, experts, ...), and ONE table (`LOGICAL_RULES`, data, not code) maps logical names
to mesh axes. Parameters get logical names from their path (`PARAM_AXES`, a small regex table), optimizer
state follows the parameter it belongs to, router biases and scalars are replicated, and batches are split
over ("data", "expert"): expert parallelism reuses the data-parallel ranks, as in DeepSeek-V3's training.

Mesh axes are `AxisType.Auto`: jit + GSPMD propagates shardings from the annotated inputs and parameters
through the unannotated model code (argsort / bincount / scatter in the MoE dispatch included). `Explicit`
axes would make every such op demand an explicit output sharding (sharding-in-types), i.e. annotations in
every layer, for the same compiled program.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.fp8 import check_mesh_tiling

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axes (empty: replicated). The only place that decides what is split over what.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "expert"),  # sequences of a global batch
    "length": (),  # positions within a sequence (no sequence parallelism)
    "act_embed": (),  # hidden dim of activations
    "embed": (),  # hidden dim of weights; ("data",) with mesh.fsdp
    "vocab": ("tensor",),
    "heads": ("tensor",),  # attention heads (q/k/v/o projections are split by whole heads)
    "mlp": ("tensor",),  # dense and shared-expert SwiGLU hidden dim
    "experts": ("expert",),  # routed experts
    "expert_mlp": ("tensor",),  # routed-expert SwiGLU hidden dim
    "q_lora": (),  # MLA latents are small; splitting them would add an all-reduce per projection
    "kv_lora": (),
    "router": (),  # router output (one logit per expert): tiny, used in fp32 by every token
    "norm": (),
    "layers": (),  # the leading axis of a scanned layer stack: never sharded (the scan walks it)
}
# ZeRO-3 style: every weight matrix also split over data, on its hidden dim (or its MLA latent dim for q_b/kv_b,
# which have no hidden dim); norms and router biases stay replicated. XLA all-gathers each weight where used.
FSDP_RULES: dict[str, tuple[str, ...]] = {"embed": ("data",), "q_lora": ("data",), "kv_lora": ("data",)}

# Parameter path (regex searched in "a/b/c", list indices included) -> logical axes, one per dimension.
# Order matters: the first match wins (routed experts before the dense/shared-expert SwiGLU kernels).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),
    (r"(^|/)lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)experts/(gate_proj|up_proj)$", ("experts", "embed", "expert_mlp")),
    (r"(^|/)experts/down_proj$", ("experts", "expert_mlp", "embed")),
    (r"(^|/)(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"(^|/)down_proj/kernel$", ("mlp", "embed")),
    (r"(^|/)gate/kernel$", ("embed", "router")),
    (r"(^|/)gate/bias$", ("router",)),
    (r"(^|/)q_a_proj/kernel$", ("embed", "q_lora")),
    (r"(^|/)q_b_proj/kernel$", ("q_lora", "heads")),
    (r"(^|/)(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),  # k/v: the MHA ablation (mha.py)
    (r"(^|/)kv_a_proj_with_mqa/kernel$", ("embed", "kv_lora")),
    (r"(^|/)kv_b_proj/kernel$", ("kv_lora", "heads")),
    (r"(^|/)o_proj/kernel$", ("heads", "embed")),
    (r"(^|/)eh_proj/kernel$", (None, "embed")),
    (r"(^|/)weight$", ("norm",)),
)

BATCH_AXES = ("batch", None)  # a [B, window] token batch


class _NoMatch(KeyError):
    pass


def path_str(path: Sequence[Any]) -> str:
    """'layers/1/mlp/experts/gate_proj' for a jax key path (the Variable's trailing `.value` dropped)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


# Parameters under these top-level names carry a leading layer axis (model.scan_layers): the rule of the
# same parameter in one layer applies to the remaining dims.
STACKED_PREFIX = re.compile(r"^(dense_layers|moe_layers)/")


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
    """Logical axes of the parameter at `path` (None: no rule, replicated)."""
    if STACKED_PREFIX.match(path):
        inner = param_logical_axes(STACKED_PREFIX.sub("", path), ndim - 1)
        return None if inner is None else ("layers", *inner)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes to {path} of rank {ndim}")
            return axes
    return None


def resolve_mesh_shape(data: int, expert: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """(data, expert, tensor) sizes; one -1 takes the rest. ConfigError unless they multiply to n_devices."""
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{name}", f"must be a positive integer or -1 (the rest), got {size!r}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh.{fill[1]}", f"only one mesh axis may be -1, got {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n_devices % fixed:
            raise ConfigError(f"mesh.{fill[0]}", f"-1 cannot fill the mesh: the other axes multiply to {fixed}, "
                              f"which does not divide the {n_devices} devices")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError("mesh", f"data*expert*tensor = {data}*{expert}*{tensor} = {fixed}, but there are "
                          f"{n_devices} devices; set one axis to -1 to use the rest")
    return sizes["data"], sizes["expert"], sizes["tensor"]


def make_mesh(data: int = -1, expert: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "expert", "tensor") mesh over `devices` (default: all), Auto axes for jit + GSPMD."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, expert, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_for(fsdp: bool = False) -> dict[str, tuple[str, ...]]:
    """The rule table, with the FSDP overrides when asked."""
    return {**LOGICAL_RULES, **(FSDP_RULES if fsdp else {})}


@dataclasses.dataclass(frozen=True, eq=False)
class MeshPlan:
    """A mesh plus the rule table: turns logical axes into PartitionSpecs / NamedShardings."""

    mesh: Mesh
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(LOGICAL_RULES))

    def spec(self, logical_axes: Sequence[str | None]) -> P:
        """PartitionSpec for one array; size-1 mesh axes and axes already used by an earlier dim are dropped."""
        used: set[str] = set()
        out = []
        for name in logical_axes:
            axes = () if name is None else self.rules[name]
            axes = tuple(a for a in axes if a not in used and self.mesh.shape[a] > 1)
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def axis_size(self, logical: str) -> int:
        return math.prod(self.mesh.shape[a] for a in self.rules[logical])

    def batch_sharding(self) -> NamedSharding:
        """[B, window] token batches: sequences split over data and expert, replicated over tensor."""
        return self.named(self.spec(BATCH_AXES))

    def param_shardings(self, params: Any) -> Any:
        """NamedSharding for every leaf of a parameter (or router-bias) tree, from `PARAM_AXES`."""
        def one(path, leaf):
            axes = param_logical_axes(path_str(path), len(leaf.shape))
            return self.replicated() if axes is None else self.named(self.spec(axes))
        return jax.tree_util.tree_map_with_path(one, params)

    def opt_state_shardings(self, opt_state: Any, params: Any) -> Any:
        """Each optimizer leaf takes the sharding of the parameter whose path (and shape) it ends with."""
        by_path = {path_str(p): (leaf.shape, s) for (p, leaf), s in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(self.param_shardings(params)))}

        def one(path, leaf):
            parts = path_str(path).split("/")
            for start in range(len(parts)):
                hit = by_path.get("/".join(parts[start:]))
                if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                    return hit[1]
            return self.replicated()  # step counts and other scalars
        return jax.tree_util.tree_map_with_path(one, opt_state)

    def check_divisible(self, tree: Any, what: str = "parameter") -> None:
        """ConfigError naming the array, dimension and mesh axes when a sharded dimension does not divide."""
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        for (path, leaf), sharding in zip(flat, jax.tree.leaves(self.param_shardings(tree))):
            for dim, axes in enumerate(sharding.spec):
                if axes is None:
                    continue
                axes = (axes,) if isinstance(axes, str) else tuple(axes)
                size = math.prod(self.mesh.shape[a] for a in axes)
                if leaf.shape[dim] % size:
                    raise ConfigError(f"mesh.{axes[0]}", f"{'*'.join(axes)} = {size} does not divide dimension "
                                      f"{dim} (size {leaf.shape[dim]}) of {what} {path_str(path)}")

    def put_batch(self, local_batch: Any, global_batch_size: int | None = None) -> jax.Array:
        """The global sharded [B, window] array from this process's rows (`process_batch_slice`)."""
        local_batch = np.asarray(local_batch)
        global_shape = None
        if global_batch_size is not None:
            global_shape = (global_batch_size, *local_batch.shape[1:])
        return jax.make_array_from_process_local_data(self.batch_sharding(), local_batch, global_shape)

    def process_batch_slice(self, global_batch_size: int) -> tuple[int, int]:
        """(index, count): this process must feed rows [index*B/count, (index+1)*B/count) of each global batch.

        count is the process count when every process owns a distinct block of the batch; processes whose
        devices hold the same rows (a tensor axis spanning hosts) get the same index and must feed identical data.
        """
        sharding = self.batch_sharding()
        indices = sharding.devices_indices_map((global_batch_size, 1))
        me = jax.process_index()
        rows: dict[int, set[tuple[int, int]]] = {}
        for device, index in indices.items():
            start, stop, _ = index[0].indices(global_batch_size)
            rows.setdefault(device.process_index, set()).add((start, stop))
        spans = {}
        for proc, blocks in rows.items():
            lo, hi = min(b[0] for b in blocks), max(b[1] for b in blocks)
            covered = sum(b[1] - b[0] for b in blocks)
            if covered != hi - lo:
                raise ConfigError("mesh", f"process {proc}'s devices hold non-contiguous rows of the batch; "
                                  "reorder the mesh so each host's devices form a block of the data axes")
            spans[proc] = (lo, hi)
        lo, hi = spans[me]
        count = global_batch_size // (hi - lo)
        if (hi - lo) * count != global_batch_size or lo % (hi - lo):
            raise ConfigError("mesh", f"process {me} holds rows [{lo}, {hi}) of a batch of {global_batch_size}, "
                              "not an aligned equal share")
        return lo // (hi - lo), count


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
    tensor, expert = plan.mesh.shape["tensor"], plan.mesh.shape["expert"]
    checks = [
        ("tensor", tensor, "model.num_attention_heads", model_cfg.num_attention_heads),
        ("tensor", tensor, "model.vocab_size", model_cfg.vocab_size),
        ("tensor", tensor, "model.moe_intermediate_size", model_cfg.moe_intermediate_size),
        ("expert", expert, "model.n_routed_experts", model_cfg.n_routed_experts),
    ]
    if model_cfg.first_k_dense_replace > 0:
        checks.append(("tensor", tensor, "model.intermediate_size", model_cfg.intermediate_size))
    if plan.rules.get("embed"):
        size = plan.axis_size("embed")
        checks.append(("data", size, "model.hidden_size (mesh.fsdp)", model_cfg.hidden_size))
        checks.append(("data", size, "model.kv_lora_rank (mesh.fsdp)", model_cfg.kv_lora_rank))
        if model_cfg.q_lora_rank is not None:
            checks.append(("data", size, "model.q_lora_rank (mesh.fsdp)", model_cfg.q_lora_rank))
    for axis, size, field, value in checks:
        if value % size:
            raise ConfigError(f"mesh.{axis}", f"{axis}={size} does not divide {field}={value}")
    if batch_size is not None:
        size = plan.axis_size("batch")
        if batch_size % size:
            raise ConfigError("mesh.data", f"data*expert = {plan.mesh.shape['data']}*{plan.mesh.shape['expert']} "
                              f"= {size} does not divide train.batch_size={batch_size}")
        if grad_accum > 1 and (batch_size // grad_accum) % size:
            raise ConfigError("train.grad_accum", f"microbatches of train.batch_size / grad_accum = {batch_size} / "
                              f"{grad_accum} = {batch_size // grad_accum} sequences do not split over data*expert "
                              f"= {size} devices")
    check_mesh_tiling(model_cfg, plan)  # FP8 tiles and blocks must not straddle shards
    if not every_param:
        return
    # Catch-all over every parameter (e.g. ones added later) without allocating anything.
    from flax import nnx

    from dsv3_jax.model import init_model
    from dsv3_jax.moe import RouterBias

    model = nnx.eval_shape(lambda: init_model(model_cfg))
    _, params, biases = nnx.split(model, nnx.Param, RouterBias)
    plan.check_divisible(params)
    plan.check_divisible(biases, "router bias")


# ---- activation annotations ---------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[MeshPlan | None] = contextvars.ContextVar("dsv3_mesh_plan", default=None)


@contextlib.contextmanager
def use_plan(plan: MeshPlan | None) -> Iterator[None]:
    """Make `constrain` active while tracing (and jax.set_mesh, for shard_map code that reads the mesh)."""
    if plan is None:
        yield
        return
    token = _ACTIVE.set(plan)
    try:
        with jax.set_mesh(plan.mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active_plan() -> MeshPlan | None:
    """The plan `use_plan` made active, or None (single device / no mesh)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """with_sharding_constraint by logical axes under an active plan; identity otherwise.

    A mesh axis that does not divide its dimension is left out (e.g. a batch of 1 while generating).
    """
    plan = _ACTIVE.get()
    if plan is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes for an array of rank {x.ndim}")
    spec = list(plan.spec(logical_axes)) + [None] * x.ndim
    for dim in range(x.ndim):
        axes = spec[dim]
        if axes is not None:
            size = math.prod(plan.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if x.shape[dim] % size:
                spec[dim] = None
    return jax.lax.with_sharding_constraint(x, plan.named(P(*spec[:x.ndim])))


class MeshFunction:
    """A jitted function called with its plan active (so `constrain` and jax.set_mesh apply while tracing)."""

    def __init__(self, jitted: Any, plan: MeshPlan):
        self.jitted, self.plan = jitted, plan

    def __call__(self, *args: Any) -> Any:
        with use_plan(self.plan):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with use_plan(self.plan):
            return self.jitted.lower(*args)


def plan_from_config(config: Any, devices: Sequence[Any] | None = None, every_param: bool = True) -> MeshPlan:
    """The run's MeshPlan from `config.mesh`, checked against the devices, model and batch (ConfigError)."""
    mesh_cfg = config.mesh.validate()
    devices = list(jax.devices() if devices is None else devices)
    resolve_mesh_shape(mesh_cfg.data, mesh_cfg.expert, mesh_cfg.tensor, len(devices))
    plan = plan_for(mesh_cfg.data, mesh_cfg.expert, mesh_cfg.tensor, mesh_cfg.fsdp, devices)
    check_model_fits(plan, config.model, config.train.batch_size, every_param, config.train.grad_accum)
    return plan


def describe(plan: MeshPlan) -> str:
    """'mesh data=2 expert=2 tensor=2 (fsdp) over 8 devices, 2 processes' for logs."""
    shape = " ".join(f"{a}={n}" for a, n in plan.mesh.shape.items())
    fsdp = " (fsdp)" if plan.rules.get("embed") else ""
    procs = len({d.process_index for d in plan.mesh.devices.flat})
    return f"mesh {shape}{fsdp} over {plan.mesh.devices.size} devices, {procs} process{'es' if procs > 1 else ''}"
