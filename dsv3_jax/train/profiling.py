"""Step timing and `jax.profiler` traces for the training loop."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax


def parse_profile(text: str) -> tuple[int, int]:
    """'START:COUNT' -> (start, count): trace the COUNT steps after step START (START >= 0, COUNT >= 1)."""
    start, sep, count = text.partition(":")
    try:
        parsed = int(start), int(count)
    except ValueError:
        parsed = None
    if not sep or parsed is None or parsed[0] < 0 or parsed[1] < 1:
        raise ValueError(f"--profile takes START:COUNT with START >= 0 and COUNT >= 1 (e.g. 5:3), got {text!r}")
    return parsed


class StepProfiler:
    """Writes a `jax.profiler` trace of steps start+1 .. start+count into `log_dir` (open it with TensorBoard's
    profile plugin or XProf). Named scopes in the model (mla_*, moe_router, moe_routed_experts, mtp_*,
    optimizer, ...) label the ops, and each step is a `StepTraceAnnotation`."""

    def __init__(self, profile: tuple[int, int] | None, log_dir: str):
        self.start, self.count = profile if profile is not None else (-1, 0)
        self.log_dir = log_dir
        self.active = False

    def before(self, step: int) -> None:
        """Call before dispatching step `step` + 1 (i.e. with `step` steps done)."""
        if step == self.start and not self.active:
            os.makedirs(self.log_dir, exist_ok=True)
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after(self, done: int, outputs: Any) -> None:
        """Call after dispatching the step that leaves `done` steps done; ends the trace once its last step ran."""
        if self.active and done >= self.start + self.count:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.start + 1}..{self.start + self.count} written to {self.log_dir} "
                  f"(tensorboard --logdir {self.log_dir})", file=sys.stderr)


class Throughput:
    """Tokens per second between consecutive finished steps (a step counts as finished when its metrics are
    read), restarted after anything that is not training (evaluation, checkpoints)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._step, self._time = 0, time.perf_counter()

    def start(self, step: int) -> None:
        self._step, self._time = step, time.perf_counter()

    def finished(self, step: int) -> float:
        now = time.perf_counter()
        rate = self.tokens_per_step * max(step - self._step, 1) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        return rate
