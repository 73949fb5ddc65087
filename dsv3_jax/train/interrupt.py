"""Clean stops on SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption notice).

While a run sets itself up (data, compilation, restore) nothing is in flight, so a signal aborts at once
(`TrainingInterrupted` with no step). Once the loop runs, a signal only raises a flag: the loop finishes the
step it is on, saves a checkpoint of it, waits for every async save to finish, then raises
`TrainingInterrupted` naming the step to resume from. A second signal while stopping is reported and ignored,
so an impatient second Ctrl-C cannot leave half-written checkpoints behind. In a multi-process run the flag is
agreed on by all processes every step (a signal may reach only one of them), so they stop at the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import numpy as np

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal; `step` is the last completed (and saved) step, None if the loop had not
    started. The CLI exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int | None = None, run_dir: str | None = None):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        where = f"after step {step} (checkpoint saved)" if step is not None else "before training started"
        super().__init__(f"stopped by {name} {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """`with StopSignals() as stop:` installs the handlers (main thread only; elsewhere it is inert).

    Before `stop.graceful()` a signal raises TrainingInterrupted where the program is; after it, the signal
    only sets `stop.signum`, which the loop polls with `stop.requested()`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._graceful = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def graceful(self) -> None:
        """From now on a signal asks the loop to stop after its current step."""
        self._graceful = True

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self._graceful:
            raise TrainingInterrupted(signum)
        if self.signum is None:
            self.signum = signum
            print(f"\n{name}: stopping after the current step (saving a checkpoint first)", file=sys.stderr,
                  flush=True)
        else:
            print(f"\n{name}: already stopping; waiting for the checkpoint to finish", file=sys.stderr, flush=True)

    def requested(self) -> int | None:
        """The signal that asked for a stop (agreed across processes), or None."""
        import jax

        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        asked = [int(s) for s in np.ravel(signums) if s]
        return asked[0] if asked else None
