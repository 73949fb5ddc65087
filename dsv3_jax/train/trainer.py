"""The training loop: data -> jitted step -> metrics, periodic eval and checkpoints, resume, final plot."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dsv3_jax import distributed, rundir, sharding
from dsv3_jax.checkpoint import RunCheckpointer
from dsv3_jax.train.balance import max_violation
from dsv3_jax.train.config import Config, layout_name, saved_scan_layers
from dsv3_jax.train.interrupt import StopSignals, TrainingInterrupted
from dsv3_jax.train.metrics import MetricsWriter, plot_run
from dsv3_jax.train.profiling import StepProfiler, Throughput
from dsv3_jax.train.setup import TrainingSetup, build_training
from dsv3_jax.train.step import TrainState

# Config sections and fields that may change when a run resumes: a checkpoint restores onto any mesh, and
# rematerialisation, gradient accumulation, the attention and loss implementations and the grouped-GEMM kernel
# change how a step is computed, not what it computes.
RESUME_IGNORED = ("mesh", "model.remat", "train.grad_accum", "model.attention_chunk", "model.attention_impl",
                  "model.loss_impl", "model.grouped_gemm", "data.workers")


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
        if f"{prefix}{key}" in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.", ignore)
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
          is_writer: bool | None = None, stop_after: int | None = None, devices: list | None = None,
          profile: tuple[int, int] | None = None, init_from: Any = None) -> RunResult:
    """Train (or resume) a run in `run_dir` on `data`: a prepared dataset from `dsv3_jax.data`, or a function
    `data(setup)` that prepares it, called once the run directory is locked and its newest checkpoint's
    settings were found to match (a refused resume costs no data preparation).

    The mesh comes from `config.mesh` over `devices` (default: every device of every process). Each process
    feeds its rows of every global batch; only the writer (process 0) holds the run directory's lock and writes
    metrics, config, tokenizer and plots, and every process takes part in checkpointing. `stop_after` ends the
    loop early after that many steps of this invocation (used by tests and benchmarks). `profile=(start, count)`
    writes a `jax.profiler` trace of steps start+1 .. start+count to RUN/profile (TensorBoard / XProf).
    `init_from` (a checkpoint checked by `hf_init.check_checkpoint`) gives a new run its published weights, read
    straight into their shardings; with `train.steps=0` only the step-0 checkpoint is written.

    The loop is asynchronous: step n+1 is dispatched before step n's metrics are read, so the host loads data
    and writes logs while the device computes (metrics, and the non-finite guard's streak, are read one step
    late; they are always read before an evaluation or a checkpoint).

    Nothing already saved is lost: every check (lock, configuration, checkpoints, data) runs before the run
    directory is changed, a run whose checkpoints all fail to restore is refused (never restarted from
    scratch), and checkpoints skipped on the way to an older one are moved to `checkpoints_broken/`.
    SIGINT/SIGTERM stop after the current step with a checkpoint (`TrainingInterrupted`).
    """
    rundir.check_training_dir(run_dir)  # someone else's folder, or a run whose checkpoints are not a directory
    setup = build_training(config, devices)  # impossible meshes and parameters fail here, before any work
    run_dir = os.path.abspath(os.fspath(run_dir))
    is_writer = distributed.is_primary() if is_writer is None else is_writer
    with contextlib.ExitStack() as lock, StopSignals() as stop:
        existing_run = os.path.isdir(run_dir)
        if is_writer and existing_run:  # an existing run is locked before anything reads it
            lock.enter_context(rundir.locked(run_dir))
        if rundir.has_checkpoints(run_dir):  # the newest checkpoint's settings, before any data work
            with contextlib.closing(RunCheckpointer(run_dir, writable=False)) as reader:
                check_checkpoint_config(reader, config)  # reads no tensor
        if callable(data):
            data = data(setup)
        if is_writer and not existing_run:  # a new run directory is created and locked once its data is ready
            lock.enter_context(rundir.locked(run_dir))
        checkpointer = RunCheckpointer(run_dir, keep=config.train.keep_checkpoints)
        try:
            restored = checkpointer.restore_latest(setup.abstract, functools.partial(config_problem, config=config),
                                                   from_weights=setup.state_from_weights)
            if restored is not None:
                _check_same_data(run_dir, data)
        except BaseException:
            checkpointer.close()
            raise
        # ---- every check passed: from here on the run directory changes --------------------------------------
        if is_writer:
            print(sharding.describe(setup.plan), file=sys.stderr)
        if restored is None and init_from is not None and config.train.steps == 0:
            return _convert(setup, checkpointer, run_dir, data, init_from, is_writer)
        step0, state, data_state = _resume(setup, checkpointer, restored, run_dir, is_writer, init_from)
        if is_writer:
            rundir.atomic_write(os.path.join(run_dir, "config.json"), config.to_json())
            rundir.save_run_data(run_dir, data)
        return _loop(setup, checkpointer, run_dir, data, stop, step0, state, data_state, show_progress=show_progress,
                     is_writer=is_writer, stop_after=stop_after, profile=profile)


def _convert(setup: TrainingSetup, checkpointer: RunCheckpointer, run_dir: str, data: Any, init_from: Any,
             is_writer: bool) -> RunResult:
    """train.steps=0 from published weights: the weights, read into their shards, as the run's step-0
    checkpoint (weights only: the optimizer state a later `train` starts is fresh anyway, so it is neither
    built nor written), with the run's config and data record. Nothing trains."""
    config, tc = setup.config, setup.config.train
    try:
        if is_writer:
            print(f"loading the weights of {tc.init_from} into their shards", file=sys.stderr)
        params, biases = setup.weights_from_hf(init_from)
        slice_index, slice_count = setup.plan.process_batch_slice(tc.batch_size)
        data_state = data.train_iterator(tc.batch_size, seed=tc.seed, process_index=slice_index,
                                         process_count=slice_count).get_state()
        if is_writer:
            rundir.atomic_write(os.path.join(run_dir, "config.json"), config.to_json())
            rundir.save_run_data(run_dir, data)
        checkpointer.save_weights(0, params, biases, data_state, config.to_dict())
    finally:
        checkpointer.close()  # waits for the save
    if is_writer:
        print(f"wrote the step-0 checkpoint of {run_dir} (weights only); train it with "
              f"python -m dsv3_jax train --run-dir {run_dir} --set train.steps=N", file=sys.stderr)
    return RunResult(run_dir=run_dir, final_step=0, plot_path=None, last_eval=None)


def config_problem(saved: dict, config: Config, weights_only: bool = False) -> str | None:
    """Why a checkpoint saved with config dict `saved` cannot be resumed as `config` (None if it can): another
    parameter layout, or other settings than those `RESUME_IGNORED` lets change. A weights-only checkpoint (a
    conversion: nothing trained yet) may go on with any training, data and mesh settings; its model may not
    change. The one resume rule."""
    layout = layout_problem(saved, config)
    if layout is not None:
        return layout
    current = config.to_dict()
    if weights_only:
        saved, current = {"model": saved.get("model")}, {"model": current["model"]}
    diffs = config_differences(saved, current)
    if diffs:
        return ("was saved with another configuration (" + "; ".join(diffs[:5]) + "). If config.json was edited "
                "by hand, restore it; otherwise use a new --run-dir, or omit --preset/--set/--corpus to resume it")
    return None


def layout_problem(saved: dict, config: Config) -> str | None:
    """Why a checkpoint saved with config dict `saved` cannot restore into `config`'s parameter layout (None
    if it can). The layouts hold the same numbers, but orbax restores by path and shape, so a run keeps the
    layout it started with."""
    saved_scan = saved_scan_layers(saved)
    if saved_scan == config.model.scan_layers:
        return None
    return (f"holds {layout_name(saved_scan)}, but this run asks for {layout_name(config.model.scan_layers)}; "
            f"resume with --set model.scan_layers={str(saved_scan).lower()} (or start a new --run-dir)")


def check_checkpoint_config(checkpointer: RunCheckpointer, config: Config) -> None:
    """ConfigMismatch if the newest checkpoint with readable metadata cannot be resumed as `config`; reads no
    tensor, so it runs before data preparation."""
    newest = checkpointer.read_config()
    problem = None if newest is None else config_problem(
        newest[1], config, bool(checkpointer.read_meta(newest[0]).get("weights_only")))
    if problem is not None:
        raise ConfigMismatch(f"{checkpointer.run_dir}: checkpoint {newest[0]} {problem}")


def _check_same_data(run_dir: str, data: Any) -> None:
    """A resumed run must read the data it started on, tokenized by its own tokenizer."""
    record = rundir.read_data_record(run_dir)
    change = rundir.corpus_change(record, data.corpus_name, data.corpus_hash)
    if change is not None:
        raise rundir.RunDirError(f"cannot resume {run_dir}: {change}. Resuming would continue on other data; "
                                 "restore the corpus, or start a new --run-dir")
    if record is not None and record.get("tokenizer_hash") != data.tokenizer.hash:
        raise rundir.RunDirError(f"cannot resume {run_dir}: the data was tokenized with another tokenizer than "
                                 f"the run's own {rundir.TOKENIZER_NAME}")


def _resume(setup: TrainingSetup, checkpointer: RunCheckpointer, restored: Any, run_dir: str,
            is_writer: bool, init_from: Any = None) -> tuple[int, TrainState, dict | None]:
    """(first step, state, data-iterator state) from the restored checkpoint, or a step-0 state (published
    weights when `init_from` is given, else fresh); checkpoints skipped on the way to the restored one are set
    aside."""
    if restored is None:
        if init_from is not None:
            if is_writer:
                print(f"loading the weights of {setup.config.train.init_from} into their shards", file=sys.stderr)
            return 0, setup.state_from_hf(init_from), None
        return 0, setup.init_state(), None
    if restored.skipped:
        moved = checkpointer.set_aside([step for step, _ in restored.skipped], mover=is_writer)
        for (step, reason), path in zip(restored.skipped, moved):
            print(f"checkpoint {step} does not restore ({reason}); moved to {path}, its steps will be redone",
                  file=sys.stderr)
    print(f"resuming {run_dir} from step {restored.step}", file=sys.stderr)
    return restored.step, restored.state, restored.data_state


def _loop(setup: TrainingSetup, checkpointer: RunCheckpointer, run_dir: str, data: Any, stop: StopSignals,
          step0: int, state: TrainState, data_state: dict | None, *, show_progress: bool, is_writer: bool,
          stop_after: int | None, profile: tuple[int, int] | None) -> RunResult:
    config, plan = setup.config, setup.plan
    tc = config.train
    # This process's rows of every global batch (hosts holding the same rows read the same slice).
    slice_index, slice_count = plan.process_batch_slice(tc.batch_size)
    train_iter = data.train_iterator(tc.batch_size, seed=tc.seed, process_index=slice_index,
                                     process_count=slice_count)
    if data_state is not None:
        train_iter.set_state(data_state)
    put, step_fn, eval_fn = setup.put_batch, setup.train_step, setup.eval_step
    writer = MetricsWriter(run_dir, enabled=is_writer, resume_step=step0)

    tokens_per_step = tc.batch_size * tc.seq_len
    last_eval = None
    end = tc.steps if stop_after is None else min(tc.steps, step0 + stop_after)
    bar = tqdm(range(step0, end), initial=step0, total=tc.steps, disable=not (show_progress and is_writer),
               dynamic_ncols=True, desc="train")
    profiler = StepProfiler(profile, os.path.join(run_dir, "profile"))
    clock = Throughput(tokens_per_step)
    saved_step, done, signum = step0, step0, None
    pending = None  # (step, metrics on device) dispatched but not yet read

    def report(step_done: int, metrics: dict) -> None:
        """Read one step's metrics (blocks on that step only), log them and stop a diverging run."""
        metrics = jax.device_get(metrics)
        streak = int(metrics.pop("nonfinite_streak"))
        tokens_per_s = clock.finished(step_done)
        diverged = streak >= tc.max_consecutive_nonfinite
        if step_done % tc.log_every == 0 or step_done == end or diverged:
            writer.write({"kind": "train", "step": step_done, "tokens_per_s": tokens_per_s, **metrics})
        if diverged:
            raise TrainingDiverged(f"{tc.max_consecutive_nonfinite} consecutive steps had a non-finite loss or "
                                   f"gradient (last at step {step_done}); lower train.peak_lr or check the data. "
                                   "Checkpoints written so far are intact.")
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tokens_per_s:,.0f}")

    stop.graceful()
    try:
        clock.start(step0)
        for step in bar:
            profiler.before(step)
            # The host loads batch n while the device still runs step n-1, then dispatches step n before it
            # reads step n-1's metrics: the device never waits for the host between steps.
            window = next(train_iter)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, put(window))
            done = step + 1
            if pending is not None:
                report(*pending)
            pending = (done, metrics)
            profiler.after(done, metrics)
            signum = stop.requested()
            evaluate_now = done % tc.eval_every == 0 or done == tc.steps
            save_now = (done % tc.checkpoint_every == 0 or done == tc.steps
                        or (signum is not None and saved_step != done))
            if evaluate_now or save_now or signum is not None or done == end:
                report(*pending)  # nothing non-finite is evaluated or saved: the guard is read first
                pending = None
            if evaluate_now:
                last_eval = evaluate(eval_fn, state.params, state.biases,
                                     data.val_batches(tc.batch_size, slice_index, slice_count), tc.eval_batches,
                                     put)
                writer.write({"kind": "eval", "step": done, **last_eval})  # expert_load: [MoE layers, E]
                bar.write(f"step {done}: val_loss {last_eval['val_loss']:.4f}  "
                          f"MaxVio_global {last_eval['maxvio_global']:.3f}")
                clock.start(done)  # eval time is not training throughput
            if save_now:
                checkpointer.save(done, state, train_iter.get_state(), config.to_dict())
                saved_step = done
                clock.start(done)
            if signum is not None:
                break
    finally:
        profiler.close()
        bar.close()
        checkpointer.close()  # waits for the in-flight async save
        writer.close()
        close = getattr(train_iter, "close", None)
        if close is not None:
            close()
    if signum is not None:
        raise TrainingInterrupted(signum, done, run_dir)
    plot_path = plot_run(run_dir) if is_writer and tc.steps > 0 else None
    return RunResult(run_dir=run_dir, final_step=end, plot_path=plot_path, last_eval=last_eval)
