"""Orbax checkpoints of a run: train state + data-iterator state + config, saved asynchronously.

Every process of a multi-host run calls save/restore (each writes/reads its own shards; process 0 writes the
metadata); the directory must be on storage all hosts share.

Restoring walks back from the newest step. Each step is checked before any tensor is read: its metadata must
parse, and every array's saved shape and dtype must match the model being restored (a mismatch is reported
by tensor name, instead of failing deep inside orbax). A step that fails any check, fails to restore, or holds
non-finite values is skipped with its reason and the previous one is tried. The caller decides what a fallback
means: `train` moves the skipped steps aside (`set_aside`) so that they are recomputed and saved again, and
refuses to start at all when checkpoints exist but none restores (`NoRestorableCheckpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dsv3_jax import distributed
from dsv3_jax.partitioning import path_str

BROKEN_DIR = "checkpoints_broken"  # beside checkpoints/: steps that failed to restore, kept for inspection


class CheckpointSaveError(RuntimeError):
    """Refused to write a checkpoint (e.g. it would hold non-finite values)."""


class CheckpointReadError(RuntimeError):
    """A saved step's arrays cannot be read (SavedArrays); the message names the step and array."""


class NoRestorableCheckpoint(RuntimeError):
    """Checkpoints exist but none restores; `failures` lists (step, reason) newest first."""

    def __init__(self, directory: str, failures: list[tuple[int, str]]):
        self.directory, self.failures = directory, failures
        tried = "; ".join(f"step {step}: {reason}" for step, reason in failures)
        super().__init__(f"no checkpoint in {directory} restores ({tried}). Nothing was changed; fix or move "
                         "the run directory, or start a new --run-dir")


@dataclasses.dataclass
class Restored:
    """A restored checkpoint, and the newer steps skipped on the way to it (newest first)."""

    step: int
    state: Any
    data_state: dict
    skipped: list[tuple[int, str]]


@jax.jit
def _finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    """One jitted reduction (a scalar, so readable on every process even when the arrays span hosts)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_finite(leaves)) if leaves else True


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    return {path_str(path): (tuple(leaf.shape), str(jnp.dtype(leaf.dtype)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def layout_mismatch(saved_tree: Any, abstract_state: Any, limit: int = 3) -> str | None:
    """How a checkpoint's array metadata differs from the state to restore (names, shapes, dtypes), or None."""
    saved, wanted = _leaf_specs(saved_tree), _leaf_specs(abstract_state)
    problems = [f"{name}: saved {saved[name][0]} {saved[name][1]}, expected {spec[0]} {spec[1]}"
                for name, spec in wanted.items() if name in saved and saved[name] != spec]
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing:
        problems.append(f"{len(missing)} arrays missing from the checkpoint (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} arrays the model does not have (e.g. {extra[0]})")
    if not problems:
        return None
    more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
    return "it holds another model: " + "; ".join(problems[:limit]) + more


def _handler_registry() -> Any:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add("state", args, ocp.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add("meta", args, ocp.JsonCheckpointHandler)
    return registry


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


class RunCheckpointer:
    """Keeps the last `keep` checkpoints of a run under `<run_dir>/checkpoints/<step>/`.

    `writable=False` (eval, generate) never creates, deletes or cleans anything: a trainer may be writing the
    same directory. A writable checkpointer (train) removes orbax's temporary directories left by a crash.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, async_save: bool = True, writable: bool = True):
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.directory = os.path.join(self.run_dir, "checkpoints")
        self.writable = writable
        if not writable and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.run_dir} has no checkpoints/ directory: train it first")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=writable, cleanup_tmp_directories=writable,
                                               save_root_metadata=writable)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start an (async) save; the previous async save is awaited first by orbax."""
        self._save(step, state, {"data_state": data_state, "config": config, "step": int(step)})

    def save_weights(self, step: int, params: Any, biases: Any, data_state: dict, config: dict) -> None:
        """A checkpoint of the weights alone (a conversion from published weights: the optimizer state would be
        fresh, so it is neither built nor written); restoring it for training starts a fresh optimizer
        (`restore_latest`'s `from_weights`)."""
        self._save(step, {"params": params, "biases": biases},
                   {"data_state": data_state, "config": config, "step": int(step), "weights_only": True})

    def _save(self, step: int, tree: Any, meta: dict) -> None:
        if not self.writable:
            raise CheckpointSaveError(f"{self.directory} was opened read-only")
        if not _all_finite(tree):
            raise CheckpointSaveError(f"refusing to save step {step}: the train state holds non-finite values")
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict:
        """A step's JSON metadata (data state, config, step); no tensor is read."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "data_state" not in meta:
            raise ValueError("its metadata is not a dsv3_jax checkpoint record")
        return meta

    def read_config(self) -> tuple[int, dict] | None:
        """(step, config) of the newest checkpoint whose metadata is readable (no tensors are read)."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)["config"]
            except Exception:  # noqa: BLE001 - unreadable metadata: restore_latest reports it
                continue
        return None

    def _check_layout(self, step: int, abstract_state: Any) -> str | None:
        metadata = self.manager.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            return "its array metadata is missing"
        return layout_mismatch(tree, abstract_state)

    def restore_latest(self, abstract_state: Any, config_problem: Any = None,
                       from_weights: Any = None) -> Restored | None:
        """The newest restorable checkpoint, None if there is no checkpoint at all, NoRestorableCheckpoint if
        there are some and none restores.

        `abstract_state` is a tree of jax.ShapeDtypeStruct; when they carry shardings (see
        `TrainingSetup.abstract` of `train.setup`) every array is read straight into that layout, so a
        checkpoint written on one mesh (or number of hosts) restores onto any other.
        `config_problem(config, weights_only=...)` may return a reason why a step's saved config is unacceptable
        (that step is then skipped). A step that
        holds weights only (`save_weights`) restores as `from_weights(params, biases)`.
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as err:  # noqa: BLE001 - any failure means "unusable"
                failures.append((step, f"unreadable metadata ({_reason(err)})"))
                continue
            weights_only = bool(meta.get("weights_only"))
            problem = config_problem(meta["config"], weights_only=weights_only) if config_problem else None
            target = ({"params": abstract_state.params, "biases": abstract_state.biases} if weights_only
                      else abstract_state)
            if problem is None and weights_only and from_weights is None:
                problem = "it holds weights only (a conversion), which this reader cannot use"
            if problem is None:
                try:
                    problem = self._check_layout(step, target)
                except Exception as err:  # noqa: BLE001
                    problem = f"unreadable array metadata ({_reason(err)})"
            if problem is None:
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                    if not _all_finite(restored.state):
                        problem = "it holds non-finite values"
                except Exception as err:  # noqa: BLE001
                    problem = f"restore failed ({_reason(err)})"
            if problem is not None:
                failures.append((step, problem))
                continue
            state = (from_weights(restored.state["params"], restored.state["biases"]) if weights_only
                     else restored.state)
            return Restored(step, state, meta["data_state"], failures)
        if failures:
            raise NoRestorableCheckpoint(self.directory, failures)
        return None

    def set_aside(self, steps: list[int], mover: bool = True) -> list[str]:
        """Move these steps' directories to RUN/checkpoints_broken/<step>-<time> (kept, never deleted), so the
        steps can be saved again; returns the new paths. Every process calls it (all must forget the steps
        before the next save); only the `mover` (process 0, on storage all hosts share) moves anything."""
        if not steps:
            return []
        self.wait()
        moved = []
        if mover:
            target_root = os.path.join(self.run_dir, BROKEN_DIR)
            os.makedirs(target_root, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                source = os.path.join(self.directory, str(step))
                if os.path.isdir(source):
                    moved.append(os.path.join(target_root, f"{step}-{stamp}"))
                    os.replace(source, moved[-1])
        distributed.barrier("dsv3_jax.checkpoints_set_aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class SavedArrays:
    """Read slices of the arrays of one saved step without restoring the state: what a streaming export needs
    (a whole [layers, experts, ...] variable of the 671B model is far larger than a host). Arrays are named
    as the state's leaves (`params.moe_layers.mlp.experts.gate_proj.value`); each read fetches only the chunks
    the slice covers, through tensorstore, with the layout orbax recorded in the step's metadata."""

    def __init__(self, step_dir: str | os.PathLike):
        import json

        self.state_dir = os.path.join(os.fspath(step_dir), "state")
        try:
            with open(os.path.join(self.state_dir, "_METADATA")) as f:
                meta = json.load(f)
            self.use_ocdbt, self.use_zarr3 = bool(meta["use_ocdbt"]), bool(meta["use_zarr3"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointReadError(f"{self.state_dir}: unreadable checkpoint metadata ({err})") from None
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
        self._open: dict[str, Any] = {}
        self._blocks: dict[str, tuple[tuple[int, ...], Any]] = {}

    def read(self, name: str, index: tuple[int, ...] = ()) -> Any:
        """Array `name` at integer `index` (leading dimensions), as a numpy array.

        Orbax stores each array in chunks (one per device shard when saved), and a chunk is read whole. So a
        read reads the chunk-aligned block around `index` (at most `BLOCK_BYTES`; outer dimensions are cut
        to one entry first) and keeps one block per array for the next reads (`BLOCKS_KEPT` arrays): an
        expert-by-expert, layer-by-layer walk reads each chunk about once."""
        import numpy as np

        array = self._array(name)
        if not index:
            return np.asarray(array.read().result())
        start, extent = self._block(name, index)
        cached = self._blocks.get(name)
        if cached is None or cached[0] != start:
            self._blocks.pop(name, None)  # the old block goes before the new one is read
            while len(self._blocks) >= self.BLOCKS_KEPT:
                self._blocks.pop(next(iter(self._blocks)))
            region = tuple(slice(a, min(n, a + e)) for a, e, n in zip(start, extent, array.shape))
            self._blocks[name] = cached = (start, np.asarray(array[region].read().result()))
        return cached[1][tuple(i - a for i, a in zip(index, start))]

    BLOCK_BYTES = 1 << 30
    BLOCKS_KEPT = 3  # the gate, up and down stacks an export walks together

    def block_order(self, name: str, index: tuple[int, ...]) -> tuple:
        """A sort key putting reads of the same block together (what `read` reads at once)."""
        return (name, self._block(name, index)[0], index) if index else (name, (), ())

    def _block(self, name: str, index: tuple[int, ...]) -> tuple[tuple[int, ...], list[int]]:
        """(start, extent) of the chunk-aligned block `read` reads around `index`."""
        import numpy as np

        array = self._array(name)
        chunk = array.chunk_layout.read_chunk.shape
        entry_bytes = array.dtype.numpy_dtype.itemsize * int(np.prod(array.shape[len(index):]))
        extent = [max(1, chunk[d] or array.shape[d]) for d in range(len(index))]
        for d in range(len(index)):  # outer dimensions first, down to one entry, until the block fits
            if int(np.prod(extent)) * entry_bytes <= self.BLOCK_BYTES:
                break
            extent[d] = 1
        return tuple(i // e * e for i, e in zip(index, extent)), extent

    def _array(self, name: str) -> Any:
        import tensorstore as ts
        from etils import epath

        if name not in self._open:
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.state_dir),
                                               use_zarr3=self.use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
            try:
                self._open[name] = ts.open(spec, open=True, context=self._context).result()
            except ValueError as err:
                raise CheckpointReadError(f"{self.state_dir}: array {name!r} cannot be read ({err})") from None
        return self._open[name]

