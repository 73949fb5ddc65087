"""The pure, jittable train and eval steps over (graphdef, TrainState).

The model is split into trainable `nnx.Param`s (seen by the optimizer) and `RouterBias` variables (moved by
the aux-loss-free rule after the optimizer update). A step whose loss or gradient is not finite changes
nothing except the skip counters, so no checkpoint can ever hold non-finite values.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, init_model
from dsv3_jax.moe import RouterBias
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


def init_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[nnx.GraphDef, TrainState]:
    """Fresh model (seeded by train_cfg.seed) and optimizer state."""
    graphdef = nnx.split(nnx.eval_shape(lambda: init_model(model_cfg, seed=train_cfg.seed)), nnx.Param, RouterBias)[0]

    @jax.jit  # one compiled program instead of hundreds of eager random ops
    def init():
        _, params, biases = nnx.split(init_model(model_cfg, seed=train_cfg.seed), nnx.Param, RouterBias)
        return params, biases, make_optimizer(train_cfg).init(params)

    params, biases, opt_state = init()
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the step donates its input)
    return graphdef, TrainState(step=zero(), params=params, biases=biases, opt_state=opt_state,
                                nonfinite_streak=zero(), skipped_total=zero())


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
