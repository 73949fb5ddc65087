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
from dsv3_jax.sharding import MeshFunction, MeshPlan
from dsv3_jax.train.balance import max_violation, update_bias
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.losses import objective, split_window
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


def state_shardings(plan: MeshPlan, abstract_state: TrainState) -> TrainState:
    """NamedShardings of every TrainState leaf: params by the rule table, optimizer state like its param,
    router biases and counters replicated."""
    repl = plan.replicated()
    return TrainState(step=repl, params=plan.param_shardings(abstract_state.params),
                      biases=jax.tree.map(lambda _: repl, abstract_state.biases),
                      opt_state=plan.opt_state_shardings(abstract_state.opt_state, abstract_state.params),
                      nonfinite_streak=repl, skipped_total=repl)


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
    return graphdef, abstract if plan is None else with_shardings(abstract, plan)


def with_shardings(abstract_state: TrainState, plan: MeshPlan) -> TrainState:
    """The abstract state with each ShapeDtypeStruct carrying its NamedSharding under `plan`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                        state_shardings(plan, abstract_state))


def init_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, plan: MeshPlan | None = None,
                     shardings: TrainState | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Fresh model (seeded by train_cfg.seed) and optimizer state; created directly sharded under `plan`, so
    no device ever holds more than its shards."""
    init = _init_fn(model_cfg, train_cfg)
    if plan is None:
        params, biases, opt_state = jax.jit(init)()  # one compiled program instead of hundreds of eager ops
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the step donates its input)
    else:
        if shardings is None:
            shardings = state_shardings(plan, abstract_train_state(model_cfg, train_cfg)[1])
        params, biases, opt_state = jax.jit(init, out_shardings=(shardings.params, shardings.biases,
                                                                 shardings.opt_state))()
        # make_array_from_callback: works when the mesh spans processes, and gives distinct (donatable) buffers
        zero = lambda: jax.make_array_from_callback((), plan.replicated(),  # noqa: E731
                                                    lambda _: np.zeros((), np.int32))
    return _graphdef(model_cfg, train_cfg), TrainState(step=zero(), params=params, biases=biases,
                                                       opt_state=opt_state, nonfinite_streak=zero(),
                                                       skipped_total=zero())


def _forward(graphdef: nnx.GraphDef, params: Any, biases: Any, window_BS: jax.Array, model_cfg: ModelConfig,
             train_cfg: TrainConfig):
    model: DeepSeekV3 = nnx.merge(graphdef, params, biases)
    inputs_BT, _ = split_window(window_BS, train_cfg.seq_len, model_cfg.mtp_depth)
    logits, aux = model(inputs_BT)
    loss, parts = objective(logits, aux, window_BS, train_cfg, model_cfg.mtp_depth)
    return loss, (parts, aux)


def _bias_update(graphdef: nnx.GraphDef, params: Any, biases: Any, counts: list[jax.Array], rate: float) -> Any:
    # copy=True: merging aliases the state's Variables by default, and mutating them here would silently
    # overwrite the *old* biases that the non-finite guard falls back to.
    model: DeepSeekV3 = nnx.merge(graphdef, params, biases, copy=True)
    for router, counts_E in zip(model.routers(), counts):
        router.bias[...] = update_bias(router.bias[...], counts_E, rate)
    return nnx.state(model, RouterBias)


def make_train_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                    train_cfg: TrainConfig) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """step(state, window [B, seq_len + 1 + D] int32) -> (new state, metrics dict of scalars / small arrays)."""
    optimizer = make_optimizer(train_cfg)
    schedule = lr_schedule(train_cfg)

    def step(state: TrainState, window_BS: jax.Array) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)
        (loss, (parts, aux)), grads = grad_fn(graphdef, state.params, state.biases, window_BS, model_cfg, train_cfg)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        counts = [layer.expert_counts for layer in aux.all_moe]
        new_biases = (_bias_update(graphdef, state.params, state.biases, counts, train_cfg.bias_update_rate)
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
        maxvio_layers = jnp.stack([max_violation(layer.expert_counts) for layer in aux.moe]) if aux.moe else jnp.zeros(0)
        metrics = {**parts, "grad_norm": grad_norm, "lr": schedule(state.step), "skipped": (~finite).astype(jnp.int32),
                   "maxvio_batch": maxvio_layers.mean() if aux.moe else jnp.float32(0.0),
                   "maxvio_batch_layers": maxvio_layers,
                   "dropped_fraction": (jnp.mean(jnp.stack([layer.dropped_fraction for layer in aux.all_moe]))
                                        if aux.all_moe else jnp.float32(0.0))}
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig,
                   train_cfg: TrainConfig) -> Callable[[Any, Any, jax.Array], dict]:
    """eval(params, biases, window) -> batch-mean losses and per-layer expert counts [n_moe, E] to accumulate."""

    def evaluate(params: Any, biases: Any, window_BS: jax.Array) -> dict:
        _, (parts, aux) = _forward(graphdef, params, biases, window_BS, model_cfg, train_cfg)
        counts = (jnp.stack([layer.expert_counts for layer in aux.moe]) if aux.moe
                  else jnp.zeros((0, model_cfg.n_routed_experts)))
        return {"loss": parts["loss"], "mtp_loss": parts["mtp_loss"], "expert_counts": counts}

    return evaluate


def jit_train_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   plan: MeshPlan | None = None, shardings: TrainState | None = None) -> Callable:
    """The train step jitted with donation; under `plan`, with explicit state and batch shardings in and out
    (metrics replicated), called with the plan active so activation constraints apply."""
    step = make_train_step(graphdef, model_cfg, train_cfg)
    if plan is None:
        return jax.jit(step, donate_argnums=0)
    if shardings is None:
        shardings = state_shardings(plan, abstract_train_state(model_cfg, train_cfg)[1])
    jitted = jax.jit(step, in_shardings=(shardings, plan.batch_sharding()),
                     out_shardings=(shardings, plan.replicated()), donate_argnums=0)
    return MeshFunction(jitted, plan)


def jit_eval_step(graphdef: nnx.GraphDef, model_cfg: ModelConfig, train_cfg: TrainConfig,
                  plan: MeshPlan | None = None, shardings: TrainState | None = None) -> Callable:
    """The eval step jitted; under `plan`, params/biases/batch sharded in and the results replicated."""
    evaluate = make_eval_step(graphdef, model_cfg, train_cfg)
    if plan is None:
        return jax.jit(evaluate)
    if shardings is None:
        shardings = state_shardings(plan, abstract_train_state(model_cfg, train_cfg)[1])
    jitted = jax.jit(evaluate, in_shardings=(shardings.params, shardings.biases, plan.batch_sharding()),
                     out_shardings=plan.replicated())
    return MeshFunction(jitted, plan)
