"""Per-device memory plan for one training step on a (data, expert, tensor) mesh, without allocating anything.

Parameter shapes come from `jax.eval_shape` on the real model code (MTP modules, shared experts, norms, router
kernels included), traced for one layer of each kind and counted once per layer of that kind
(`dsv3_jax.accounting.layer_templates`), so planning takes the same time at any depth. Each parameter's
per-device size follows the logical axes each parameter was created with, turned into a PartitionSpec by the
partitioner training uses (`MeshPlan` on an abstract mesh of the planned sizes), which gives:

* routed experts ([E, D, F] gate/up, [E, F, D] down): E over `expert`, F over `tensor`;
* attention: `q_b_proj` / `q_proj` and `kv_b_proj` outputs (heads x head dims) and the `o_proj` input over
  `tensor`; dense-layer MLP and shared experts: the hidden width over `tensor`;
* `embed_tokens` ([V, D]) and `lm_head` ([D, V]): the vocabulary over `tensor`;
* everything else (norms, `q_a_proj`, `kv_a_proj_with_mqa`, router kernels, `eh_proj`) replicated;
* `fsdp=True` additionally splits every weight matrix over `data` x `expert` (routed experts: over `data`),
  on its hidden (model) dimension, or on the MLA latent for `q_b_proj` / `kv_b_proj`; optimizer moments and gradients follow their parameters. Router
  biases and norms stay replicated.

The batch is split over data x expert; the expert-parallel MoE sees the tokens of the `expert` devices that
share a data index (one all-to-all group). Capacity is sized from that group's tokens. (moe.py today sizes it
from the tokens it is traced with, i.e. the global batch under plain GSPMD jit; unless the capacity axis is
also split over `data`, its buffers are then `data` times the figure here.)

Activation formula for `model.remat=none` (rematerialisation below). With a = bytes of `cfg.dtype`, B the local
batch, n the positions a stack processes (seq_len + mtp_depth for the main model, n - k for MTP depth k),
N = B n local tokens, H = heads / tensor, it sums what autodiff keeps for the backward pass:

* per MLA block: layer input and its norm [N, D]; q_a and its norm [N, q_lora]; q [N, H (dn + dr)];
  kv_a [N, C + dr], normed c_kv [N, C], rotated k_pe [N, dr]; kv [N, H (dn + dv)]; scores [B, H, n, n] in
  fp32 and probabilities [B, H, n, n] in a; attention output [N, H dv]; all in a except the scores. Where
  backend_policy.choose picks a fused kernel, no scores: the concatenated queries and keys [N, H (dn + dr)]
  twice and the kernel's fp32 log-sum-exp [B, H, n] instead (a formula from the kernels' residuals, not yet
  checked against a compiled step the way the XLA case is);
* per MoE block: post-attention residual and norm [N, D]; router logits and scores [N, E] fp32; the routed
  experts' dispatch buffers for the configured dispatch, for E_l = E / expert local experts, F_l = F / tensor
  and the G = N x expert tokens of the expert-parallel group (A = N K local assignments):
    - dense: [G, E_l, F_l] gate, up and product, [G, E_l, D] outputs (a and fp32 copies);
    - capacity: R = E_l C rows with C = `expert_capacity(G, K, E, capacity_factor)` (dropless: C = G):
      buffer [R, D], gate/up/product [R, F_l], outputs [R, D]; gathered inputs and outputs [A, D];
      fp32 combine [N, D];
    - ragged (expert-parallel ragged_dot): M = expert x `exchange_capacity` receive rows (dropless:
      expert x N x min(K, E_l); with a capacity_factor: expert x ceil(factor N K / expert)): received, regrouped, output and returned rows [M, D], gate/up/product [M, F_l],
      sent and returned assignments [A, D], fp32 combine [N, D];
    - blocked: R = n_blocks x 128 rows (n_blocks = ceil((G K + E_l 127) / 128)): the same row buffers plus
      the per-block gathered weights 3 x [n_blocks, D, F_l];
  shared experts: gate/up/product [N, n_shared F_l] and output [N, D];
* per dense-MLP block: gate/up/product [N, I / tensor] and output [N, D];
* per MTP module: the two norms, the concatenation [N, 2D], eh_proj output and head norm [N, D];
* logits: [B, n, V / tensor] fp32 twice (logits and log-softmax) for the main head and every MTP head; with
  the `chunked` loss (GPU/TPU) only the heads' inputs [H, B, n, D] and fp32 log-sum-exps [H, B, n];
* when `dtype` differs from `param_dtype`: the compute-dtype copy of every local weight (kept for the
  backward matmuls);
* plus the largest transient of the backward pass: the max of the logits gradient (2 x [B, n, V/tensor]
  fp32; chunked: one chunk's 3 x [B, 512, V/tensor]),
  one block's score/probability gradients (2 x [B, H, n, n] fp32) and one MoE block's dispatch
  buffers (their gradients).

With `model.remat=full` every layer keeps only its input [N, D] (`remat_layer_inputs`); with `minimal` also
the tensors of `dsv3_jax.remat_names.MINIMAL_SAVED`: q_a [N, q_lora], q [N, H (dn + dr)], kv_a [N, C + dr],
kv [N, H (dn + dv)] and the attention output [N, H dv], the gate and up GEMM outputs of the routed experts
(2 x [rows, F_l], rows as the dispatch above), shared experts (2 x [N, n_shared F_l]) and dense MLPs
(2 x [N, I / tensor]). The backward pass then recomputes one layer at a time, so the largest transient becomes
one layer's full forward set (less what is kept) plus its own backward transient.

Gradients are counted separately (same size and sharding as the parameters, in the parameter dtype).
Measured against XLA on one CPU device with the state donated, as the trainer does (tests/test_plan.py):
params + optimizer + biases + counters + batch equal `argument_size_in_bytes` exactly, and activations +
gradients came within 0.97x-1.16x of `temp_size_in_bytes` over tiny/small, batch 2-8, seq 32-256 and all
three dispatches in fp32 (0.85x-1.01x with bf16 compute). It is a formula over the tensors autodiff keeps,
not a replay of XLA's buffer assignment: fusion, other backends and sharded programs will move it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jax.sharding import AbstractMesh

from dsv3_jax.accounting import layer_templates
from dsv3_jax.backend_policy import (SPILL_BLOCK_ROWS, SPILL_CAPACITY_FACTOR, Implementation, choose,
                                     current_backend)
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.kv_cache import latent_cache_bytes_per_token
from dsv3_jax.moe import expert_capacity
from dsv3_jax.moe_ragged import exchange_capacity
from dsv3_jax.partitioning import (MESH_AXES, MeshPlan, check_divisibility, path_str, resolve_mesh_shape,
                                   rules_for)

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one training step (see the module docstring for what each figure counts)."""

    mesh: dict[str, int]
    fsdp: bool
    n_devices: int
    local_batch: int  # sequences per device
    positions: int  # seq_len + mtp_depth: what the main stack processes per sequence
    moe_dispatch: str
    params: int
    optimizer: int  # AdamW moments + optax's scalar counts
    router_biases: int
    gradients: int
    activations: int
    batch_inputs: int  # the int32 token window
    counters: int  # TrainState step / skip counters
    kv_cache_bytes_per_token: int  # decoding cache per token over all layers (latent + rope key), per device
    activation_breakdown: dict[str, int]

    @property
    def state(self) -> int:
        """What a compiled step takes as arguments: the whole TrainState plus the batch."""
        return self.params + self.optimizer + self.router_biases + self.counters + self.batch_inputs

    @property
    def total(self) -> int:
        return self.state + self.gradients + self.activations

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---- mesh ----------------------------------------------------------------------------------------------------
def normalize_mesh(mesh_shape: Mapping[str, int] | None) -> dict[str, int]:
    """{data, expert, tensor} with missing axes set to 1 (sizes checked by `resolve_mesh_shape`, as training
    checks them; a -1 axis is 1 here, with no devices to fill); an unknown axis is a ConfigError."""
    mesh_shape = dict(mesh_shape or {})
    unknown = sorted(set(mesh_shape) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh.{unknown[0]}", f"unknown mesh axis; the axes are {MESH_AXES}")
    return dict(zip(MESH_AXES, resolve_mesh_shape(*(mesh_shape.get(axis, 1) for axis in MESH_AXES), None)))


def validate_mesh(model_cfg: ModelConfig, mesh_shape: Mapping[str, int], batch_size: int | None = None,
                  fsdp: bool = False, grad_accum: int = 1) -> dict[str, int]:
    """Raise ConfigError naming the axis and the dimension it does not divide (the same rules as training:
    `partitioning.check_divisibility`); return the normalised mesh."""
    mesh = normalize_mesh(mesh_shape)
    check_divisibility(model_cfg, mesh, fsdp, batch_size, grad_accum)
    return mesh


# ---- parameter sharding --------------------------------------------------------------------------------------
def mesh_plan(mesh: Mapping[str, int], fsdp: bool) -> MeshPlan:
    """The training partitioner (`MeshPlan`) on an abstract mesh of these sizes: no devices needed."""
    return MeshPlan(AbstractMesh(tuple(mesh[a] for a in MESH_AXES), MESH_AXES), rules_for(fsdp))


def local_shape(shape: tuple[int, ...], spec: tuple[str | tuple[str, ...] | None, ...],
                mesh: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape (ceil division, as GSPMD pads an uneven split); `spec` may be shorter than `shape`
    (a PartitionSpec drops its trailing unsplit dims)."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    def ways(axes: str | tuple[str, ...] | None) -> int:
        return 1 if axes is None else mesh[axes] if isinstance(axes, str) else math.prod(mesh[a] for a in axes)

    return tuple(-(-dim // ways(axes)) for dim, axes in zip(shape, spec))


def kv_cache_bytes_per_token(model_cfg: ModelConfig) -> int:
    """Absorbed-MLA decode cache per token: (kv_lora_rank + qk_rope_head_dim) x layers x bytes of `dtype`.

    The latent is shared by all heads, so tensor parallelism does not split it (every device holds it).
    """
    return latent_cache_bytes_per_token(model_cfg, model_cfg.dtype)


# ---- the plan ------------------------------------------------------------------------------------------------
def estimate_memory(model_cfg: ModelConfig, train_cfg, mesh_shape: Mapping[str, int] | None = None,
                    fsdp: bool = False, backend: str | None = None) -> MemoryPlan:
    """Per-device bytes of one train step (`dsv3_jax.train.step`) of `model_cfg` / `train_cfg` on the mesh.

    `backend` ("cpu", "gpu", "tpu"; default: this machine's) decides the `auto` choices (backend_policy.choose:
    MoE dispatch, grouped GEMM, attention kernel, loss), as a run there would.
    """
    backend = backend or current_backend()
    from dsv3_jax.train.optim import make_optimizer  # local: keeps `import dsv3_jax.plan` light

    model_cfg.validate()
    mesh = validate_mesh(model_cfg, mesh_shape or {}, train_cfg.batch_size, fsdp, train_cfg.grad_accum)
    # One template per kind of variable (a dense layer's, a MoE layer's, an MTP module's, the rest), each
    # counted `copies` times: nothing here grows with the depth. Sharding specs depend on the parameter's
    # name, not on its layer index, so a template's shard is every copy's.
    params, biases = layer_templates(model_cfg)
    partitioner = mesh_plan(mesh, fsdp)
    local = [(local_shape(t.shape, tuple(partitioner.spec(t.axes or ())), mesh), t) for t in params]
    param_bytes = sum(math.prod(shape) * jnp.dtype(t.dtype).itemsize * t.copies for shape, t in local)
    global_param_bytes = sum(t.size * jnp.dtype(t.dtype).itemsize * t.copies for t in params)
    bias_bytes = sum(t.size * jnp.dtype(t.dtype).itemsize * t.copies for t in biases)

    # Optimizer: moments mirror their parameters (same shape, dtype and sharding); scalars are replicated.
    # A flat dict of shape structs (the templates) stands in for the nnx.State: optax only maps over the
    # leaves, so each state leaf under a template's key stands for that template's copies.
    structs = {path_str(t.path): jax.ShapeDtypeStruct(t.shape, t.dtype) for t in params}
    copies = {path_str(t.path): t.copies for t in params}

    def weight(key_path) -> int:
        return next((copies[k.key] for k in key_path
                     if isinstance(k, jax.tree_util.DictKey) and k.key in copies), 1)

    opt_leaves = jax.tree_util.tree_leaves_with_path(jax.eval_shape(make_optimizer(train_cfg).init, structs))
    scalar_bytes = sum(weight(kp) * leaf.dtype.itemsize for kp, leaf in opt_leaves if leaf.ndim == 0)
    moment_bytes = sum(weight(kp) * math.prod(leaf.shape) * leaf.dtype.itemsize
                       for kp, leaf in opt_leaves if leaf.ndim > 0)
    moments_per_param = Fraction(moment_bytes, global_param_bytes) if global_param_bytes else 0  # exact
    optimizer_bytes = round(moments_per_param * param_bytes) + scalar_bytes

    local_batch = train_cfg.batch_size // (mesh["data"] * mesh["expert"])
    micro_batch = local_batch // train_cfg.grad_accum  # activations exist for one microbatch at a time
    positions = train_cfg.seq_len + model_cfg.mtp_depth
    breakdown = activation_breakdown(model_cfg, micro_batch, positions, mesh,
                                     sum(math.prod(shape) * t.copies for shape, t in local), backend, fsdp)
    # under accumulation the running sum and the microbatch's own gradients coexist
    gradient_bytes = param_bytes * (2 if train_cfg.grad_accum > 1 else 1)
    return MemoryPlan(
        mesh=dict(mesh), fsdp=fsdp, n_devices=math.prod(mesh.values()), local_batch=local_batch,
        positions=positions, moe_dispatch=choose(model_cfg, backend, partitioner.facts()).moe_dispatch, params=param_bytes, optimizer=optimizer_bytes,
        router_biases=bias_bytes, gradients=gradient_bytes, activations=sum(breakdown.values()),
        batch_inputs=local_batch * (train_cfg.seq_len + 1 + model_cfg.mtp_depth) * 4, counters=3 * 4,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(model_cfg),
        activation_breakdown=breakdown)


def _capacity_rows(cfg: ModelConfig, impl: Implementation, group: int, e_local: int) -> int:
    """Rows of `capacity` dispatch's expert buffers: E_l x C slots, plus the block-padded spill rows when
    dropless capacity spills (backend_policy.choose, moe.RoutedExperts.capacity)."""
    k = cfg.num_experts_per_tok
    if impl.capacity_spill:
        slots = e_local * expert_capacity(group, k, cfg.n_routed_experts, SPILL_CAPACITY_FACTOR)
        return slots + group * k + e_local * (SPILL_BLOCK_ROWS - 1)
    return e_local * expert_capacity(group, k, cfg.n_routed_experts, cfg.capacity_factor)


def _blocked_rows(impl: Implementation, assignments: int, e_local: int) -> int:
    """Rows of `blocked` dispatch: each expert's assignments padded to whole blocks of impl.block_rows."""
    block = impl.block_rows
    return -(-(assignments + e_local * (block - 1)) // block) * block


def _expert_rows(cfg: ModelConfig, impl: Implementation, tokens: int, mesh: Mapping[str, int]) -> int:
    """Rows of the routed-expert gate/up GEMM outputs on one device (what `minimal` remat keeps of them)."""
    k = cfg.num_experts_per_tok
    e_local = cfg.n_routed_experts // mesh["expert"]
    group = tokens * mesh["expert"]
    if impl.moe_dispatch == "dense":
        return group * e_local
    if impl.moe_dispatch == "capacity":
        return _capacity_rows(cfg, impl, group, e_local)
    if impl.moe_dispatch == "ragged":
        return mesh["expert"] * exchange_capacity(tokens, k, e_local, mesh["expert"], cfg.capacity_factor)
    return _blocked_rows(impl, group * k, e_local)


def _dispatch_bytes(cfg: ModelConfig, impl: Implementation, tokens: int, mesh: Mapping[str, int]) -> int:
    """Routed-expert buffers of one MoE block on one device (see the module docstring)."""
    a = jnp.dtype(cfg.dtype).itemsize
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    e_local = cfg.n_routed_experts // mesh["expert"]
    f_local = cfg.moe_intermediate_size // mesh["tensor"]
    group = tokens * mesh["expert"]
    assignments = tokens * k
    if impl.moe_dispatch == "dense":
        return group * e_local * (3 * f_local * a + d * (a + 4))
    if impl.moe_dispatch == "capacity":
        rows = _capacity_rows(cfg, impl, group, e_local)
        return rows * (2 * d + 3 * f_local) * a + 2 * assignments * d * a + tokens * d * 4
    if impl.moe_dispatch == "ragged" or impl.expert_parallel:
        # moe_ragged's receive buffer: `expert` sources x exchange_capacity rows each (dropless: min(K, E_l)
        # rows per token; with a capacity_factor the bounded fair share); received, regrouped, output and
        # returned rows [M, D], gate/up/product [M, F_l]; sent and returned assignment rows [A, D]; fp32
        # combine [N, D].
        rows = mesh["expert"] * exchange_capacity(tokens, k, e_local, mesh["expert"], cfg.capacity_factor)
        return rows * (4 * d + 3 * f_local) * a + 2 * assignments * d * a + tokens * d * 4
    rows = _blocked_rows(impl, group * k, e_local)
    n_blocks = rows // impl.block_rows
    return (rows * (2 * d + 3 * f_local) * a + 3 * n_blocks * d * f_local * a
            + 2 * assignments * d * a + tokens * d * 4)


def activation_breakdown(model_cfg: ModelConfig, local_batch: int, positions: int,
                         mesh_shape: Mapping[str, int] | None = None, local_param_elements: int = 0,
                         backend: str | None = None, fsdp: bool = False) -> dict[str, int]:
    """Bytes kept for the backward pass (by component) plus the largest backward transient, per device.

    `local_param_elements` (per-device parameter count) sizes the compute-dtype weight copies kept when
    `dtype` differs from `param_dtype`. `backend` (default: this machine's) and the mesh decide the
    implementations (backend_policy.choose), as the layers do.
    """
    cfg = model_cfg
    mesh = normalize_mesh(mesh_shape)
    impl = choose(cfg, backend or current_backend(), mesh_plan(mesh, fsdp).facts())
    a = jnp.dtype(cfg.dtype).itemsize
    d, t = cfg.hidden_size, mesh["tensor"]
    heads = cfg.num_attention_heads // t
    q_lora = cfg.q_lora_rank or 0
    vocab_local = cfg.vocab_size // t
    out = dict.fromkeys(("weight_casts", "remat_layer_inputs", "attention", "moe_router", "moe_dispatch",
                         "shared_experts", "dense_mlp", "mtp", "logits", "transient"), 0)
    if jnp.dtype(cfg.dtype) != jnp.dtype(cfg.param_dtype):
        out["weight_casts"] = local_param_elements * a
    transient = 0

    def block(n: int, moe: bool, copies: int = 1) -> None:
        """Add `copies` identical blocks over n positions (all dense or all MoE), kept as `cfg.remat` says."""
        nonlocal transient
        if copies <= 0:
            return
        add = {}
        tokens = local_batch * n
        per_token = (2 * d + 2 * q_lora + heads * cfg.qk_head_dim + cfg.kv_cache_dim + cfg.kv_lora_rank
                     + cfg.qk_rope_head_dim + heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                     + heads * cfg.v_head_dim)
        chunk = impl.attention_chunk
        if impl.attention in ("splash", "tokamax"):  # kernels.causal_attention: no scores leave the kernel
            # kept: the concatenated [N, H, qk] queries and keys the kernel reads, its fp32 log-sum-exp [B, H, n]
            add["attention"] = tokens * (per_token + 2 * heads * cfg.qk_head_dim) * a + local_batch * heads * n * 4
            own_transient = tokens * heads * (2 * cfg.qk_head_dim + cfg.v_head_dim) * a  # dq, dk, dv
        elif chunk is None or chunk >= n:  # fp32 scores and the kept probabilities, [B, H, T, S] each
            scores = local_batch * heads * n * n
            add["attention"] = tokens * per_token * a + scores * (4 + a)
            own_transient = 2 * scores * 4
        else:  # mla.attend_causal: one checkpointed [B, H, chunk, S] slice at a time, nothing kept
            add["attention"] = tokens * per_token * a
            own_transient = 3 * local_batch * heads * chunk * n * 4  # scores, probabilities, their gradient
        shared_width = cfg.n_shared_experts * cfg.moe_intermediate_size // t
        if moe:
            add["moe_router"] = 2 * d * tokens * a + 2 * tokens * cfg.n_routed_experts * 4
            dispatch = _dispatch_bytes(cfg, impl, tokens, mesh)
            add["moe_dispatch"] = dispatch
            own_transient = max(own_transient, dispatch)
            if cfg.n_shared_experts:
                add["shared_experts"] = tokens * (3 * shared_width + d) * a
        else:
            add["dense_mlp"] = 2 * d * tokens * a + tokens * (3 * cfg.intermediate_size // t + d) * a
        if cfg.remat == "none":
            kept = add
            transient = max(transient, own_transient)
        else:
            # The layer input is the checkpoint (the scan carry); in the backward pass one layer at a time is
            # recomputed, so its whole forward set (less what is kept anyway) is the largest transient.
            kept = {"remat_layer_inputs": tokens * d * a}
            if cfg.remat == "minimal":  # remat_names.MINIMAL_SAVED
                kept["attention"] = tokens * a * (q_lora + heads * cfg.qk_head_dim + cfg.kv_cache_dim
                                                  + heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                                                  + heads * cfg.v_head_dim)
                if moe:
                    kept["moe_dispatch"] = (2 * _expert_rows(cfg, impl, tokens, mesh)
                                            * (cfg.moe_intermediate_size // t) * a)
                    if cfg.n_shared_experts:
                        kept["shared_experts"] = 2 * tokens * shared_width * a
                else:
                    kept["dense_mlp"] = 2 * tokens * (cfg.intermediate_size // t) * a
            recomputed = sum(add.values()) - sum(kept.values()) + tokens * d * a
            transient = max(transient, recomputed + own_transient)
        for name, value in kept.items():
            out[name] += copies * value

    # Every main layer of a kind keeps the same tensors: one formula per kind, times the number of layers.
    block(positions, moe=False, copies=cfg.first_k_dense_replace)
    block(positions, moe=True, copies=cfg.n_moe_layers)
    head_tokens = [local_batch * positions]
    for depth in range(1, cfg.mtp_depth + 1):
        n = positions - depth
        if n <= 0:
            break
        out["mtp"] += local_batch * n * 6 * d * a  # enorm, hnorm, concat (2D), eh_proj, head norm
        block(n, moe=True)
        head_tokens.append(local_batch * n)
    if impl.loss == "chunked":  # head_loss: the heads' stacked inputs and fp32 log-sum-exps are kept; the
        # backward's transient is one chunk's logits, softmax and gradient (the head's fp32 gradient is the
        # step's gradient buffer: benchmarks/loss_memory.py compiles to less than its size in temporaries)
        out["logits"] = len(head_tokens) * head_tokens[0] * (d * a + 4)
        loss_transient = 3 * local_batch * impl.loss_chunk * vocab_local * 4
    else:
        out["logits"] = sum(2 * tokens * vocab_local * 4 for tokens in head_tokens) + head_tokens[0] * 2 * d * a
        loss_transient = 2 * max(head_tokens) * vocab_local * 4
    out["transient"] = max(transient, loss_transient)
    return out


# ---- presentation --------------------------------------------------------------------------------------------
def format_plan(plan: MemoryPlan, as_json: bool = False) -> str:
    """A readable per-device table in GiB (or the plan's JSON with `as_json=True`)."""
    if as_json:
        return plan.to_json()
    mesh = " x ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    lines = [f"mesh {mesh} ({plan.n_devices} devices){', fsdp' if plan.fsdp else ''}; "
             f"{plan.local_batch} sequence(s) x {plan.positions} positions per device; "
             f"MoE dispatch {plan.moe_dispatch}",
             f"{'per device':<34}{'GiB':>12}"]
    rows = [("params", plan.params), ("optimizer state (AdamW)", plan.optimizer),
            ("router biases", plan.router_biases), ("gradients", plan.gradients),
            ("activations", plan.activations)]
    rows += [(f"  {name}", value) for name, value in plan.activation_breakdown.items() if value]
    rows += [("batch inputs + counters", plan.batch_inputs + plan.counters)]
    lines += [f"{name:<34}{value / GIB:>12.3f}" for name, value in rows]
    lines.append(f"{'total':<34}{plan.total / GIB:>12.3f}")
    lines.append(f"KV cache per token (decode): {plan.kv_cache_bytes_per_token:,} bytes "
                 f"({plan.kv_cache_bytes_per_token / 1024:.1f} KiB)")
    return "\n".join(lines)
