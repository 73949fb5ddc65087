"""Shared by the training benchmarks: the real jitted train step lowered for abstract inputs."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.train.config import Config, TrainConfig
from dsv3_jax.train.setup import build_on_one_device, build_training


def one_device_setup(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Any:
    """The trainer's setup of these configs on this host's first device."""
    return build_on_one_device(Config(model=model_cfg, train=train_cfg))


def compile_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[Any, dict[str, float], Any]:
    """(compiled step, {"trace_s", "compile_s"}, its one-device setup): tracing+lowering and XLA compilation
    timed apart."""
    t0 = time.perf_counter()
    setup = one_device_setup(model_cfg, train_cfg)
    lowered = setup.train_step.lower(setup.abstract, setup.window)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"trace_s": t1 - t0, "compile_s": t2 - t1}, setup


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

    setup = build_training(config)
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(setup.abstract, setup.window).compile()
    compile_s = time.perf_counter() - t0
    shape, vocab = setup.window.shape, config.model.vocab_size
    windows = [setup.plan.put_batch(np.asarray(jax.random.randint(jax.random.key(i), shape, 0, vocab, dtype=jnp.int32)))
               for i in range(4)]
    return TrainerStep(compiled, sharding.MeshFunction(compiled, setup.plan), setup.init_state(), windows, compile_s)
