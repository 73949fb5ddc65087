"""The logical-axis rule table and activation constraints: what every layer needs to be sharded, and nothing
that depends on the model (the leaf of the sharding code; run-level planning is `dsv3_jax.sharding`).

Every array dimension we shard has a *logical* name (batch, embed, heads, vocab, experts, ...), and ONE table
(`LOGICAL_RULES`, data, not code) maps logical names to mesh axes. Each parameter is created with its logical
names (`param`, at the line that creates it; a scanned layer stack adds its never-sharded `layers` axis),
optimizer state follows the parameter it belongs to, router biases and scalars are replicated, and batches
are split over ("data", "expert"): expert parallelism reuses the data-parallel ranks, as in DeepSeek-V3's
training. `constrain` annotates activations while a `MeshPlan` is active (`use_plan`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.backend_policy import Implementation, MeshFacts, choose, current_backend
from dsv3_jax.config import ConfigError, ModelConfig

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axes (empty: replicated). The only place that decides what is split over what.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "expert"),  # sequences of a global batch
    "length": (),  # positions within a sequence (no sequence parallelism)
    "act_embed": (),  # hidden dim of activations
    "embed": (),  # hidden dim of weights; ("data", "expert") with mesh.fsdp
    "vocab": ("tensor",),
    "heads": ("tensor",),  # attention heads (q/k/v/o projections are split by whole heads)
    "mlp": ("tensor",),  # dense-layer SwiGLU hidden dim
    "experts": ("expert",),  # routed experts
    "expert_mlp": ("tensor",),  # routed and shared experts' SwiGLU hidden dim
    "q_lora": (),  # MLA latents are small; splitting them would add an all-reduce per projection
    "kv_lora": (),
    "router": (),  # router output (one logit per expert): tiny, used in fp32 by every token
    "norm": (),
    "layers": (),  # the leading axis of a scanned layer stack: never sharded (the scan walks it)
}
# ZeRO-3 style: every weight matrix also split over every batch-sharding axis (data and expert), on its hidden dim
# (or its MLA latent dim for q_b/kv_b, which have no hidden dim); norms and router biases stay replicated. XLA
# all-gathers each weight where used. Routed experts already use `expert` for their expert dim, so `spec` drops
# it there and their hidden dim goes over `data` alone; attention, dense and shared-expert weights go over
# data*expert, the whole batch-parallel group (otherwise every expert rank would hold a full copy: at 671B on
# 512 chips that is 13 GiB of parameters per chip instead of 5).
FSDP_AXES = ("data", "expert")
FSDP_RULES: dict[str, tuple[str, ...]] = {"embed": FSDP_AXES, "q_lora": FSDP_AXES, "kv_lora": FSDP_AXES}

BATCH_AXES = ("batch", None)  # a [B, window] token batch


def path_str(path: Sequence[Any], sep: str = "/") -> str:
    """'layers/1/mlp/experts/gate_proj' for a jax key path or an nnx flat-state path (the Variable's trailing
    `.value` dropped). The one way parameter paths become names: sharding rules, checkpoint checks, the memory
    plan and the HF name table (`sep="."`) all use it."""
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
    return sep.join(parts)


def param(value: Any, *axes: str | None, **metadata: Any) -> nnx.Param:
    """An `nnx.Param` that carries its logical axes (one per dimension) as its sharding metadata: the one place
    a weight's sharding is stated. A stack of layers prepends `layers` (`stack.stacked_layers`); the partitioner,
    the FP8 tiling check, the memory plan and checkpoints read the axes back with `logical_axes`. Nothing is
    sharded when the parameter is created (`eager_sharding=False`): `MeshPlan.shardings` decides placement."""
    if len(axes) != jnp.ndim(value):
        raise ValueError(f"{len(axes)} logical axes {axes} for a parameter of rank {jnp.ndim(value)}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, **metadata)


def logical_axes(variable: Any) -> tuple[str | None, ...] | None:
    """The logical axes a Variable was created with (None: none declared, e.g. an optimizer's step count)."""
    if not isinstance(variable, nnx.Variable):
        return None
    axes = variable.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


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

    def split_of(self, entry: str | tuple[str, ...] | None) -> tuple[tuple[str, ...], int]:
        """(mesh axes, how many shards) of one PartitionSpec entry; ((), 1) for an unsplit dimension."""
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return axes, math.prod(self.mesh.shape[a] for a in axes)

    def facts(self) -> MeshFacts:
        """What backend_policy.choose needs to know about this mesh."""
        expert_axes = self.rules["experts"]
        return MeshFacts(devices=math.prod(self.mesh.shape.values()), token_shards=self.axis_size("batch"),
                         experts_split_tokens=bool(expert_axes) and expert_axes[0] in self.rules["batch"])

    def batch_sharding(self) -> NamedSharding:
        """[B, window] token batches: sequences split over data and expert, replicated over tensor."""
        return self.named(self.spec(BATCH_AXES))

    def sharding_of(self, variable: Any) -> NamedSharding:
        """A Variable's NamedSharding from its logical axes; replicated when it declares none."""
        axes = logical_axes(variable)
        return self.replicated() if axes is None else self.named(self.spec(axes))

    def shardings(self, tree: Any) -> Any:
        """NamedSharding for every leaf of any state tree (parameters, router biases, optimizer state, a whole
        TrainState): each Variable's from its own axes (optimizer moments are copies of their parameter's
        Variable, so they follow it), everything else (step counts, counters) replicated."""
        return jax.tree.map(lambda x: x.replace(value=self.sharding_of(x)) if _is_variable(x) else self.replicated(),
                            tree, is_leaf=_is_variable)

    def check_divisible(self, tree: Any, what: str = "parameter") -> None:
        """ConfigError naming the array, dimension and mesh axes when a sharded dimension does not divide."""
        for path, variable in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
            for dim, entry in enumerate(self.sharding_of(variable).spec):
                axes, size = self.split_of(entry)
                if variable.shape[dim] % size:
                    raise ConfigError(f"mesh.{axes[0]}", f"{'*'.join(axes)} = {size} does not divide dimension "
                                      f"{dim} (size {variable.shape[dim]}) of {what} {path_str(path)}")

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


def resolve_mesh_shape(data: int, expert: int, tensor: int, n_devices: int | None) -> tuple[int, int, int]:
    """(data, expert, tensor) sizes; one may be -1 and takes the rest of `n_devices` (or 1 when the device
    count is not known yet). The one check of mesh sizes: ConfigError for a size that is not a positive
    integer or -1, two -1s, or sizes that do not multiply to `n_devices`."""
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{name}", f"must be an integer >= 1 or -1 (the rest), got {size!r}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError("mesh", f"only one axis may be -1, got data={data}, expert={expert}, tensor={tensor}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n_devices is not None and n_devices % fixed:
            raise ConfigError(f"mesh.{fill[0]}", f"-1 cannot fill the mesh: the other axes multiply to {fixed}, "
                              f"which does not divide the {n_devices} devices")
        sizes[fill[0]] = 1 if n_devices is None else n_devices // fixed
    elif n_devices is not None and fixed != n_devices:
        raise ConfigError("mesh", f"data*expert*tensor = {data}*{expert}*{tensor} = {fixed}, but there are "
                          f"{n_devices} devices; set one axis to -1 to use the rest")
    return sizes["data"], sizes["expert"], sizes["tensor"]


def check_divisibility(model_cfg: ModelConfig, mesh: Mapping[str, int], fsdp: bool = False,
                       batch_size: int | None = None, grad_accum: int = 1) -> None:
    """ConfigError naming the mesh axis and the model or batch dimension it does not divide.

    The one place that decides which sizes each mesh axis must divide (`sharding.check_model_fits` on a real
    mesh and `plan.validate_mesh` on a hypothetical one both call it): `tensor` splits heads, vocabulary,
    expert width and dense width; `expert` the routed experts; `data*expert` with FSDP the hidden and latent
    dims, and the batch (and each microbatch under gradient accumulation)."""
    tensor, expert, data = mesh["tensor"], mesh["expert"], mesh["data"]
    checks = [
        ("tensor", tensor, "num_attention_heads", model_cfg.num_attention_heads, ""),
        ("tensor", tensor, "vocab_size", model_cfg.vocab_size, ""),
        ("tensor", tensor, "moe_intermediate_size", model_cfg.moe_intermediate_size, ""),
        ("expert", expert, "n_routed_experts", model_cfg.n_routed_experts, ""),
    ]
    if model_cfg.first_k_dense_replace > 0:
        checks.append(("tensor", tensor, "intermediate_size", model_cfg.intermediate_size, ""))
    if fsdp:
        why = " (fsdp splits the weight matrices over data*expert)"
        checks.append(("data", data * expert, "hidden_size", model_cfg.hidden_size, why))
        checks.append(("data", data * expert, "kv_lora_rank", model_cfg.kv_lora_rank, why))
        if model_cfg.q_lora_rank is not None:
            checks.append(("data", data * expert, "q_lora_rank", model_cfg.q_lora_rank, why))
    for axis, size, field, value, why in checks:
        if value % size:
            shown = "data*expert" if why and expert > 1 else axis
            raise ConfigError(f"mesh.{axis}", f"{shown}={size} does not divide model.{field}={value}{why}")
    if batch_size is not None:
        shards = data * expert
        if batch_size % shards:
            raise ConfigError("mesh.data", f"data*expert = {data}*{expert} = {shards} does not divide "
                              f"train.batch_size={batch_size}")
        if grad_accum > 1 and (batch_size // grad_accum) % shards:
            raise ConfigError("train.grad_accum", f"microbatches of train.batch_size / grad_accum = {batch_size} / "
                              f"{grad_accum} = {batch_size // grad_accum} sequences do not split over data*expert "
                              f"= {shards} devices")


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


def implementation(cfg: ModelConfig, n_tokens: int | None = None) -> Implementation:
    """backend_policy.choose for the code being traced: the backend of JAX's default device and the active
    plan's mesh (one device without one). What every layer asks before picking a path."""
    plan = _ACTIVE.get()
    return choose(cfg, current_backend(), plan.facts() if plan is not None else None, n_tokens)


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
        if x.shape[dim] % plan.split_of(spec[dim])[1]:
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
