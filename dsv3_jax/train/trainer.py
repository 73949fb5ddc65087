"""The training loop: data -> jitted step -> metrics, periodic eval and checkpoints, resume, final plot."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dsv3_jax import sharding
from dsv3_jax.checkpoint import RunCheckpointer
from dsv3_jax.train.balance import max_violation
from dsv3_jax.train.config import Config
from dsv3_jax.train.metrics import MetricsWriter, plot_run
from dsv3_jax.train.step import (abstract_train_state, init_train_state, jit_eval_step, jit_train_step,
                                 state_shardings, with_shardings)

# Config sections that may change when a run resumes: a checkpoint restores onto any mesh.
RESUME_IGNORED = ("mesh",)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


class ConfigMismatch(ValueError):
    """A run directory holds checkpoints of a different configuration."""


@dataclasses.dataclass
class RunResult:
    run_dir: str
    final_step: int
    plot_path: str | None
    last_eval: dict[str, Any] | None


def config_differences(saved: dict, current: dict, prefix: str = "",
                       ignore: tuple[str, ...] = RESUME_IGNORED) -> list[str]:
    """Dotted names of fields whose values differ between two config dicts (top-level `ignore` sections aside)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.", ())
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return out


def evaluate(eval_fn, params, biases, batches, max_batches: int = 0, put=jnp.asarray) -> dict[str, Any]:
    """Validation loss (token-weighted mean over batches) and MaxVio_global over the whole validation set.

    `put` turns a process-local batch into the step's input (`MeshPlan.put_batch` on a mesh).
    """
    losses, mtp_losses, counts = [], [], None
    for i, window in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(eval_fn(params, biases, put(window)))
        losses.append(float(out["loss"]))
        mtp_losses.append(float(out["mtp_loss"]))
        counts = out["expert_counts"] if counts is None else counts + out["expert_counts"]
    if not losses:
        raise ValueError("the validation split yielded no batch; use a larger corpus or smaller train.batch_size")
    vio_layers = [float(max_violation(c)) for c in counts] if counts is not None and len(counts) else []
    return {"val_loss": float(np.mean(losses)), "val_mtp_loss": float(np.mean(mtp_losses)),
            "maxvio_global": float(np.mean(vio_layers)) if vio_layers else 0.0,
            "maxvio_global_layers": vio_layers, "val_batches": len(losses),
            "expert_load": counts}


def train(config: Config, run_dir: str | os.PathLike, data: Any, *, show_progress: bool = True,
          is_writer: bool | None = None, stop_after: int | None = None, devices: list | None = None) -> RunResult:
    """Train (or resume) a run in `run_dir` on `data` (a prepared dataset from `dsv3_jax.data`).

    The mesh comes from `config.mesh` over `devices` (default: every device of every process). Each process
    feeds its rows of every global batch; only the writer (process 0) writes metrics, config and plots, and
    every process takes part in checkpointing. `stop_after` ends the loop early after that many steps of this
    invocation (used by tests and benchmarks).
    """
    config.validate()
    plan = sharding.plan_from_config(config, devices, every_param=False)  # impossible meshes fail here
    run_dir = os.path.abspath(os.fspath(run_dir))
    os.makedirs(run_dir, exist_ok=True)
    is_writer = jax.process_index() == 0 if is_writer is None else is_writer
    mc, tc = config.model, config.train
    if is_writer:
        print(sharding.describe(plan), file=sys.stderr)

    graphdef, abstract = abstract_train_state(mc, tc)
    plan.check_divisible(abstract.params)  # every parameter, before anything compiles
    abstract = with_shardings(abstract, plan)
    shardings = state_shardings(plan, abstract)
    checkpointer = RunCheckpointer(run_dir, keep=tc.keep_checkpoints)
    restored = checkpointer.restore_latest(abstract)  # straight into this mesh's layout
    data_state = None
    if restored is not None:
        step0, state, data_state, saved_config = restored
        diffs = config_differences(saved_config, config.to_dict())
        if diffs:
            checkpointer.close()
            raise ConfigMismatch(f"{run_dir} holds checkpoints of another configuration ("
                                 + "; ".join(diffs[:5]) + "). Use a new --run-dir or the saved settings.")
        print(f"resuming {run_dir} from step {step0}", file=sys.stderr)
    else:
        step0 = 0
        state = init_train_state(mc, tc, plan, shardings)[1]
    if is_writer:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(config.to_json())

    # This process's rows of every global batch (hosts holding the same rows read the same slice).
    slice_index, slice_count = plan.process_batch_slice(tc.batch_size)
    train_iter = data.train_iterator(tc.batch_size, seed=tc.seed, process_index=slice_index,
                                     process_count=slice_count)
    if data_state is not None:
        train_iter.set_state(data_state)
    put = lambda local: plan.put_batch(local, tc.batch_size)  # noqa: E731
    step_fn = jit_train_step(graphdef, mc, tc, plan, shardings)
    eval_fn = jit_eval_step(graphdef, mc, tc, plan, shardings)
    writer = MetricsWriter(run_dir, enabled=is_writer, resume_step=step0 if restored is not None else None)

    tokens_per_step = tc.batch_size * tc.seq_len
    last_eval = None
    end = tc.steps if stop_after is None else min(tc.steps, step0 + stop_after)
    bar = tqdm(range(step0, end), initial=step0, total=tc.steps, disable=not (show_progress and is_writer),
               dynamic_ncols=True, desc="train")
    try:
        t_last = time.perf_counter()
        for step in bar:
            window = next(train_iter)
            state, metrics = step_fn(state, put(window))
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            tokens_per_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            done = step + 1
            diverged = int(state.nonfinite_streak) >= tc.max_consecutive_nonfinite
            if done % tc.log_every == 0 or done == end or diverged:
                writer.write({"kind": "train", "step": done, "tokens_per_s": tokens_per_s,
                              "skipped_total": int(state.skipped_total), **metrics})
            if diverged:
                raise TrainingDiverged(f"{tc.max_consecutive_nonfinite} consecutive steps had a non-finite loss or "
                                       f"gradient (last at step {done}); lower train.peak_lr or check the data. "
                                       "Checkpoints written so far are intact.")
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if done % tc.eval_every == 0 or done == tc.steps:
                last_eval = evaluate(eval_fn, state.params, state.biases,
                                     data.val_batches(tc.batch_size, slice_index, slice_count), tc.eval_batches,
                                     put)
                writer.write({"kind": "eval", "step": done, **last_eval})  # expert_load: [MoE layers, E]
                bar.write(f"step {done}: val_loss {last_eval['val_loss']:.4f}  "
                          f"MaxVio_global {last_eval['maxvio_global']:.3f}")
                t_last = time.perf_counter()  # eval time is not training throughput
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                checkpointer.save(done, state, train_iter.get_state(), config.to_dict())
                t_last = time.perf_counter()
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
        close = getattr(train_iter, "close", None)
        if close is not None:
            close()
    plot_path = plot_run(run_dir) if is_writer else None
    return RunResult(run_dir=run_dir, final_step=end, plot_path=plot_path, last_eval=last_eval)
