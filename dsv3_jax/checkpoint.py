"""Orbax checkpoints of a run: train state + data-iterator state + config, saved asynchronously.

Every process of a multi-host run calls save/restore (each writes/reads its own shards; process 0 writes the
metadata); the directory must be on storage all hosts share.

Restoring walks back from the newest step: a checkpoint that is incomplete or fails to restore is skipped
with a warning and the previous one is used, so a crash mid-save never strands a run.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointSaveError(RuntimeError):
    """Refused to write a checkpoint (e.g. it would hold non-finite values)."""


@jax.jit
def _finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    """One jitted reduction (a scalar, so readable on every process even when the arrays span hosts)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True


class RunCheckpointer:
    """Keeps the last `keep` checkpoints of a run under `<run_dir>/checkpoints/<step>/`."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(os.fspath(run_dir), "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start an (async) save; the previous async save is awaited first by orbax."""
        if not _all_finite(state):
            raise CheckpointSaveError(f"refusing to save step {step}: the train state holds non-finite values")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"data_state": data_state, "config": config, "step": int(step)})))

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, config) of the newest restorable checkpoint, or None if there is none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct; when they carry shardings (see
        `train.step.abstract_train_state(..., plan)`) every array is read straight into that layout, so a
        checkpoint written on one mesh (or number of hosts) restores onto any other.
        """
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - any failure means "unusable", we fall back
                warnings.warn(f"checkpoint at step {step} in {self.directory} could not be restored "
                              f"({type(err).__name__}: {str(err)[:200]}); trying the previous one", stacklevel=2)
                continue
            if not _all_finite(restored.state):
                warnings.warn(f"checkpoint at step {step} holds non-finite values; trying the previous one",
                              stacklevel=2)
                continue
            meta = restored.meta
            return step, restored.state, meta["data_state"], meta["config"]
        return None

    def read_config(self) -> dict | None:
        """The config saved with the newest checkpoint whose metadata is readable (no tensors are read)."""
        for step in reversed(self.steps()):
            try:
                return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta["config"]
            except Exception:  # noqa: BLE001
                continue
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
