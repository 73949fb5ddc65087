"""Shared by the training benchmarks: the real jitted train step lowered for abstract inputs."""

from __future__ import annotations

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
