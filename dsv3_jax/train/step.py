"""The pure, jittable train and eval steps over (graphdef, TrainState).

The model is split into trainable `nnx.Param`s (seen by the optimizer) and `RouterBias` variables (moved by
the aux-loss-free rule after the optimizer update). A step whose loss or gradient is not finite changes
nothing except the skip counters, so no checkpoint can ever hold non-finite values.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, init_model
from dsv3_jax.moe import RouterBias
from dsv3_jax.partitioning import MeshFunction, MeshPlan, constrain, implementation
from dsv3_jax.train.balance import max_violation, update_bias
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.losses import head_score, objective, split_window
from dsv3_jax.train.optim import lr_schedule, make_optimizer


@struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed)."""

    step: jax.Array  # int32 scalar: updates attempted so far
    params: Any  # nnx.State of Params (fp32 master weights)
    biases: Any  # nnx.State of RouterBias
    opt_state: Any
    nonfinite_streak: jax.Array  # consecutive skipped steps
    skipped_total: jax.Array


def _init_fn(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Callable[[], tuple[Any, Any, Any]]:
    def init():
        _, params, biases = nnx.split(init_model(model_cfg, seed=train_cfg.seed), nnx.Param, RouterBias)
        return params, biases, make_optimizer(train_cfg).init(params)
    return init


def _graphdef(model_cfg: ModelConfig, train_cfg: TrainConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: init_model(model_cfg, seed=train_cfg.seed)), nnx.Param, RouterBias)[0]


def abstract_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig,
                         plan: MeshPlan | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of ShapeDtypeStructs) without allocating; each carries its sharding under `plan`
    (the restore target that lets a checkpoint load onto any mesh)."""
    model = nnx.eval_shape(lambda: init_model(model_cfg, seed=train_cfg.seed))
    graphdef, params, biases = nnx.split(model, nnx.Param, RouterBias)
    opt_state = jax.eval_shape(make_optimizer(train_cfg).init, params)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=params, biases=biases, opt_state=opt_state, nonfinite_streak=scalar,
                          skipped_total=scalar)
    return graphdef, abstract if plan is None else with_shardings(abstract, plan.shardings(abstract))


def with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    """The abstract state with each ShapeDtypeStruct carrying its NamedSharding (`MeshPlan.shardings`)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def _require(shardings: TrainState | None, plan: MeshPlan | None) -> None:
    if plan is not None and shardings is None:
        raise TypeError("a mesh plan needs the state's shardings (train.setup.build_training builds both)")


def init_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, plan: MeshPlan | None = None,
                     shardings: TrainState | None = None,
                     graphdef: nnx.GraphDef | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Fresh model (seeded by train_cfg.seed) and optimizer state; created directly in `shardings` under
    `plan`, so no device ever holds more than its shards. A caller that holds the graphdef passes it, so the
    model is not traced again."""
    _require(shardings, plan)
    init = _init_fn(model_cfg, train_cfg)
    if plan is None:
        params, biases, opt_state = jax.jit(init)()  # one compiled program instead of hundreds of eager ops
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the step donates its input)
    else:
        params, biases, opt_state = jax.jit(init, out_shardings=(shardings.params, shardings.biases,
                                                                 shardings.opt_state))()
        # make_array_from_callback: works when the mesh spans processes, and gives distinct (donatable) buffers
        zero = lambda: jax.make_array_from_callback((), plan.replicated(),  # noqa: E731
                                                    lambda _: np.zeros((), np.int32))
    graphdef = _graphdef(model_cfg, train_cfg) if graphdef is None else graphdef
    return graphdef, TrainState(step=zero(), params=params, biases=biases,
                                                       opt_state=opt_state, nonfinite_streak=zero(),
                                                       skipped_total=zero())


def train_state_from(params: Any, biases: Any, model_cfg: ModelConfig, train_cfg: TrainConfig,
                     plan: MeshPlan | None = None, shardings: TrainState | None = None) -> TrainState:
    """A step-0 state around given parameters and router biases (published weights, hf_init): the optimizer
    state fresh, created in its shardings under `plan`."""
    _require(shardings, plan)
    init = make_optimizer(train_cfg).init
    if plan is None:
        opt_state = jax.jit(init)(params)
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    else:
        opt_state = jax.jit(init, out_shardings=shardings.opt_state)(params)
        zero = lambda: jax.make_array_from_callback((), plan.replicated(),  # noqa: E731
                                                    lambda _: np.zeros((), np.int32))
    return TrainState(step=zero(), params=params, biases=biases, opt_state=opt_state, nonfinite_streak=zero(),
                      skipped_total=zero())


def _forward(graphdef: nnx.GraphDef, params: Any, biases: Any, window_BS: jax.Array, model_cfg: ModelConfig,
             train_cfg: TrainConfig):
    model: DeepSeekV3 = nnx.merge(graphdef, params, biases)
    inputs_BT, _ = split_window(window_BS, train_cfg.seq_len, model_cfg.mtp_depth)
    head_inputs, score = head_score(model.lm_head, implementation(model_cfg))
    outputs, aux = model(inputs_BT, head_inputs=head_inputs)
    loss, parts = objective(outputs, aux, window_BS, train_cfg, model_cfg.mtp_depth, score, head_inputs)
    return loss, (parts, aux)


def _bias_update(graphdef: nnx.GraphDef, params: Any, biases: Any, counts_RE: jax.Array, rate: float) -> Any:
    """Every router's bias moved by its layer's global expert counts (`counts_RE` in `Aux.per_router` order):
    one vectorised update for a stack of MoE layers, one per MTP block."""
    # copy=True: merging aliases the state's Variables by default, and mutating them here would silently
    # overwrite the *old* biases that the non-finite guard falls back to.
    model: DeepSeekV3 = nnx.merge(graphdef, params, biases, copy=True)
    row = 0
    for router in model.routers():
        bias = router.bias[...]
        n = bias.shape[0] if bias.ndim == 2 else 1
        counts = counts_RE[row:row + n].reshape(bias.shape)
        router.bias[...] = update_bias(bias, counts, rate)
        row += n
    return nnx.state(model, RouterBias)


def _microbatches(window_BS: jax.Array, n: int) -> jax.Array:
    """[B, S] -> [n, B/n, S], microbatch j holding rows j, j + n, j + 2n, ... Each device's contiguous block of
    rows (the batch is split over data x expert) splits evenly over the microbatches, so no row moves."""
    batch, width = window_BS.shape
    micro_NBS = window_BS.reshape(batch // n, n, width).transpose(1, 0, 2)
    return constrain(micro_NBS, None, "batch", None)


def _gradients(graphdef: nnx.GraphDef, state: TrainState, window_BS: jax.Array, model_cfg: ModelConfig,
               train_cfg: TrainConfig) -> tuple[dict, Any, jax.Array, jax.Array]:
    """(mean loss parts, mean gradients, summed expert counts per router [R, E], mean dropped fraction [R])
    over the step's batch, in `train.grad_accum` microbatches scanned inside the step.

    Every loss is a mean over equal-sized microbatches, so the mean of the microbatch gradients is the
    whole-batch gradient (up to float32 summation order); the expert counts add up to the global counts."""
    grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)

    def one(window_BS: jax.Array):
        (_, (parts, aux)), grads = grad_fn(graphdef, state.params, state.biases, window_BS, model_cfg, train_cfg)
        return parts, grads, aux.per_router("expert_counts"), aux.per_router("dropped_fraction")

    n = train_cfg.grad_accum
    if n == 1:
        return one(window_BS)
    micro_NBS = _microbatches(window_BS, n)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, micro_NBS[0]))

    def accumulate(total, window_BS):
        with jax.named_scope("microbatch"):
            window_BS = constrain(window_BS, "batch", None)
            return jax.tree.map(jnp.add, total, one(window_BS)), None

    (parts, grads, counts_RE, dropped_R), _ = jax.lax.scan(accumulate, zeros, micro_NBS)
    mean = lambda tree: jax.tree.map(lambda x: x / n, tree)  # noqa: E731
    return mean(parts), mean(grads), counts_RE, dropped_R / n


def make_train_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                    train_cfg: TrainConfig) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """step(state, window [B, seq_len + 1 + D] int32) -> (new state, metrics dict of scalars / small arrays)."""
    optimizer = make_optimizer(train_cfg)
    schedule = lr_schedule(train_cfg)
    n_main_moe = model_cfg.n_moe_layers

    def step(state: TrainState, window_BS: jax.Array) -> tuple[TrainState, dict]:
        parts, grads, counts_RE, dropped_R = _gradients(graphdef, state, window_BS, model_cfg, train_cfg)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(parts["total_loss"]) & jnp.isfinite(grad_norm)
            updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
        with jax.named_scope("bias_update"):
            new_biases = (_bias_update(graphdef, state.params, state.biases, counts_RE, train_cfg.bias_update_rate)
                          if train_cfg.balance == "aux_free" else state.biases)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            biases=keep(new_biases, state.biases),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
            skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
        )
        maxvio_layers = max_violation(counts_RE[:n_main_moe]) if n_main_moe else jnp.zeros(0)  # main layers only
        metrics = {**parts, "grad_norm": grad_norm, "lr": schedule(state.step), "skipped": (~finite).astype(jnp.int32),
                   "maxvio_batch": maxvio_layers.mean() if n_main_moe else jnp.float32(0.0),
                   "maxvio_batch_layers": maxvio_layers,
                   "dropped_fraction": dropped_R.mean() if dropped_R.size else jnp.float32(0.0),
                   # copies of the counters, so a loop that reads metrics a step late never touches the
                   # (donated) state of that step
                   "nonfinite_streak": new_state.nonfinite_streak, "skipped_total": new_state.skipped_total}
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                   train_cfg: TrainConfig) -> Callable[[Any, Any, jax.Array], dict]:
    """eval(params, biases, window) -> batch-mean losses and per-layer expert counts [n_moe, E] to accumulate."""

    def evaluate(params: Any, biases: Any, window_BS: jax.Array) -> dict:
        _, (parts, aux) = _forward(graphdef, params, biases, window_BS, model_cfg, train_cfg)
        counts = aux.moe.expert_counts if aux.moe is not None else jnp.zeros((0, model_cfg.n_routed_experts))
        return {"loss": parts["loss"], "mtp_loss": parts["mtp_loss"], "expert_counts": counts}

    return evaluate


def jit_train_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   plan: MeshPlan | None = None, shardings: TrainState | None = None) -> Callable:
    """The train step jitted with donation; under `plan`, with explicit state and batch shardings in and out
    (metrics replicated), called with the plan active so activation constraints apply."""
    _require(shardings, plan)
    step = make_train_step(graphdef, model_cfg, train_cfg)
    if plan is None:
        return jax.jit(step, donate_argnums=0)
    jitted = jax.jit(step, in_shardings=(shardings, plan.batch_sharding()),
                     out_shardings=(shardings, plan.replicated()), donate_argnums=0)
    return MeshFunction(jitted, plan)


def jit_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, train_cfg: TrainConfig,
                  plan: MeshPlan | None = None, shardings: TrainState | None = None) -> Callable:
    """The eval step jitted; under `plan`, params/biases/batch sharded in and the results replicated."""
    _require(shardings, plan)
    evaluate = make_eval_step(graphdef, model_cfg, train_cfg)
    if plan is None:
        return jax.jit(evaluate)
    jitted = jax.jit(evaluate, in_shardings=(shardings.params, shardings.biases, plan.batch_sharding()),
                     out_shardings=plan.replicated())
    return MeshFunction(jitted, plan)
