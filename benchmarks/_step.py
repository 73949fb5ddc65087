"""Shared by the training benchmarks: the real jitted train step lowered for abstract inputs."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.train.config import TrainConfig
from dsv3_jax.train.step import init_train_state, make_train_step


def abstract_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(jitted donated step, abstract TrainState, abstract window) without allocating the model."""
    built = {}

    def build():
        built["graphdef"], state = init_train_state(model_cfg, train_cfg)
        return state

    state = jax.eval_shape(build)
    step = jax.jit(make_train_step(built["graphdef"], model_cfg, train_cfg), donate_argnums=0)
    window = jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.seq_len + 1 + model_cfg.mtp_depth), jnp.int32)
    return step, state, window


def compile_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[Any, dict[str, float]]:
    """(compiled step, {"trace_s", "compile_s"}): tracing+lowering and XLA compilation timed apart."""
    t0 = time.perf_counter()
    step, state, window = abstract_step(model_cfg, train_cfg)
    lowered = step.lower(state, window)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"trace_s": t1 - t0, "compile_s": t2 - t1}


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one step from XLA's cost analysis (None where the backend reports none, e.g. GPU)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - "not supported" on some backends
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


@dataclasses.dataclass
class TrainerStep:
    """The train step exactly as the trainer compiles it (mesh plan, shardings, donation), its live state and
    four device-resident random windows to feed it."""

    compiled: Any
    step: Any  # sharding.MeshFunction over `compiled`
    state: Any
    windows: list
    compile_s: float

    def run(self, n: int, first: int = 0) -> list[float]:
        """`n` steps, each blocked on before the next: their wall times in seconds."""
        durations = []
        for i in range(first, first + n):
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, self.windows[i % len(self.windows)])
            jax.block_until_ready(metrics)
            durations.append(time.perf_counter() - t0)
        return durations

    def median_s(self, steps: int, warmup: int) -> tuple[float, list[float]]:
        """(median step seconds over `steps` after `warmup` steps, all timed durations)."""
        self.run(warmup)
        durations = self.run(steps, warmup)
        return statistics.median(durations), durations


def trainer_step(config: Any) -> TrainerStep:
    """Compile `config`'s train step as the trainer does and create its state (one device or the mesh)."""
    import numpy as np

    from dsv3_jax import sharding
    from dsv3_jax.train.step import abstract_train_state, jit_train_step, state_shardings

    mc, tc = config.model, config.train
    plan = sharding.plan_from_config(config, every_param=False)
    graphdef, abstract = abstract_train_state(mc, tc, plan)
    shardings = state_shardings(plan, abstract)
    window_shape = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1 + mc.mtp_depth), jnp.int32,
                                        sharding=plan.batch_sharding())
    t0 = time.perf_counter()
    compiled = jit_train_step(graphdef, mc, tc, plan, shardings).lower(abstract, window_shape).compile()
    compile_s = time.perf_counter() - t0
    _, state = init_train_state(mc, tc, plan, shardings, graphdef)
    windows = [plan.put_batch(np.asarray(jax.random.randint(jax.random.key(i), window_shape.shape, 0, mc.vocab_size,
                                                            dtype=jnp.int32))) for i in range(4)]
    return TrainerStep(compiled, sharding.MeshFunction(compiled, plan), state, windows, compile_s)
