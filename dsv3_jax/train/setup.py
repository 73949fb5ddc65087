"""The training setup, built once: mesh plan -> graphdef and abstract state -> shardings -> jitted steps.

`train`, `eval`, `compile`, `generate` (restoring a run) and the benchmarks all start from `build_training`,
so a run is planned, checked and sharded the same way wherever it is used, and the model is traced once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import sharding
from dsv3_jax.partitioning import MeshPlan
from dsv3_jax.train.config import Config, MeshConfig
from dsv3_jax.train.step import (TrainState, abstract_train_state, init_train_state, jit_eval_step, jit_train_step,
                                 train_state_from, with_shardings)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingSetup:
    """Everything derived from a config and its devices, before any array exists."""

    config: Config
    plan: MeshPlan
    graphdef: nnx.GraphDef
    abstract: TrainState  # ShapeDtypeStructs carrying their shardings: the restore target on this mesh
    shardings: TrainState  # NamedSharding of every TrainState leaf

    @property
    def window(self) -> jax.ShapeDtypeStruct:
        """One global [batch, seq_len + 1 + mtp_depth] int32 token window, sharded as the step takes it."""
        tc = self.config.train
        return jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1 + self.config.model.mtp_depth), jnp.int32,
                                    sharding=self.plan.batch_sharding())

    def init_state(self) -> TrainState:
        """A fresh state (seeded by train.seed), created directly in its shards."""
        return init_train_state(self.config.model, self.config.train, self.plan, self.shardings, self.graphdef)[1]

    def weights_from_hf(self, ckpt: Any) -> tuple[Any, Any]:
        """(parameters, router biases) of a checked HF checkpoint (`hf_init.check_checkpoint`), each read
        straight into its shards."""
        from dsv3_jax.hf_init import load_sharded

        model_cfg = self.config.model
        return (load_sharded(ckpt, model_cfg, self.abstract.params),
                load_sharded(ckpt, model_cfg, self.abstract.biases))

    def state_from_hf(self, ckpt: Any) -> TrainState:
        """A step-0 state from a checked HF checkpoint's weights; the optimizer state is fresh."""
        return self.state_from_weights(*self.weights_from_hf(ckpt))

    def state_from_weights(self, params: Any, biases: Any) -> TrainState:
        """A step-0 state around these weights (in their shardings) with a fresh optimizer state."""
        return train_state_from(params, biases, self.config.model, self.config.train, self.plan, self.shardings)

    @functools.cached_property
    def train_step(self) -> sharding.MeshFunction:
        """step(state, window) -> (state, metrics), jitted with the state donated."""
        return jit_train_step(self.graphdef, self.config.model, self.config.train, self.plan, self.shardings)

    @functools.cached_property
    def eval_step(self) -> sharding.MeshFunction:
        """eval(params, biases, window) -> losses and expert counts."""
        return jit_eval_step(self.graphdef, self.config.model, self.config.train, self.plan, self.shardings)

    def put_batch(self, local_window: Any) -> jax.Array:
        """This process's rows of a global batch as the step's sharded input."""
        return self.plan.put_batch(local_window, self.config.train.batch_size)


def build_training(config: Config, devices: Sequence[Any] | None = None) -> TrainingSetup:
    """The setup of `config` over `devices` (default: every device of every process).

    Named ConfigErrors, before anything compiles, for a mesh that does not fit the devices, a model or batch
    dimension a mesh axis does not divide (every parameter is checked), or FP8 tiles a split would cut."""
    config.validate()
    plan = sharding.plan_from_config(config, devices, every_param=False)
    graphdef, abstract = abstract_train_state(config.model, config.train)
    plan.check_divisible(abstract.params)
    shardings = plan.shardings(abstract)
    return TrainingSetup(config, plan, graphdef, with_shardings(abstract, shardings), shardings)


def build_on_one_device(config: Config) -> TrainingSetup:
    """The setup of `config` on this process's first device, whatever mesh `config.mesh` names: restoring a run
    to read it (generation), benchmarks of one device."""
    return build_training(dataclasses.replace(config, mesh=MeshConfig(data=1)), jax.devices()[:1])
