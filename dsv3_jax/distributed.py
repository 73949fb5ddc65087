"""Multi-process (multi-host) runs: join the JAX cluster before anything touches a device.

Every process runs the same command. With explicit flags (`--coordinator host:port --num-processes N
--process-id I`) any cluster works, CPU processes on one machine included; with none, JAX reads the cluster's
environment (Cloud TPU slices, SLURM, Open MPI, Kubernetes JobSets). After `initialize`, `jax.devices()` lists
every process's devices, so the default mesh spans the whole cluster; each process feeds its rows of every
global batch (see `MeshPlan.process_batch_slice`), process 0 writes logs and metrics, and all processes
write their shards of each checkpoint.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Callable, Sequence, TypeVar

import jax

from dsv3_jax.config import ConfigError


class DistributedError(RuntimeError):
    """Could not join (or find) the cluster."""


class PrimaryFailed(DistributedError):
    """Process 0 failed the work the other processes were waiting for."""


T = TypeVar("T")
_WAIT_SLICE_MS = 60_000  # one blocking read of the marker; the wait itself has no limit
_primary_calls = itertools.count()  # every process calls primary_first in the same order: same keys


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, timeout_s: int = 300) -> tuple[int, int]:
    """jax.distributed.initialize from explicit settings, or from the cluster environment when none is given.

    Returns (process_index, process_count). Must run before the first JAX computation or device query.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise ConfigError(missing[0], "explicit cluster settings need --coordinator, --num-processes and "
                              f"--process-id together (missing {', '.join(missing)})")
        if ":" not in coordinator:
            raise ConfigError("--coordinator", f"must be host:port, got {coordinator!r}")
        if num_processes < 1:
            raise ConfigError("--num-processes", f"must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ConfigError("--process-id", f"must be in [0, {num_processes}), got {process_id}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
    except (ValueError, RuntimeError) as err:
        hint = ("" if coordinator else " No cluster was detected in the environment (Cloud TPU, SLURM, Open MPI, "
                "Kubernetes); pass --coordinator HOST:PORT --num-processes N --process-id I.")
        raise DistributedError(f"jax.distributed.initialize failed: {err}.{hint}") from err
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics and plots."""
    return jax.process_index() == 0


def _kv_client():
    from jax._src import distributed as jax_distributed  # the coordination service's key-value store

    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError("a multi-process run without jax.distributed: call distributed.initialize first")
    return client


def primary_first(work: Callable[[], T], name: str, log: Callable[[str], None] | None = None) -> T:
    """`work()` on process 0 first, then on every other process once process 0 has finished it.

    Made for work whose result is cached on disk (data preparation): process 0 does it once, the others then
    read its cache, or redo it where the cache is not on a filesystem they share. The others wait on a marker in
    jax.distributed's key-value store, not in a collective, so a preparation of hours times nothing out; if
    process 0 fails, they raise `PrimaryFailed` with its one-line error instead of waiting forever (and if
    process 0 dies, the coordination service it hosts goes with it, which ends their wait too).
    """
    if jax.process_count() == 1:
        return work()
    key = f"dsv3_jax/primary_first/{next(_primary_calls)}/{name}"
    client = _kv_client()
    if is_primary():
        try:
            result = work()
        except BaseException as err:
            client.key_value_set(key, f"failed: {type(err).__name__}: {' '.join(str(err).split())[:500]}")
            raise
        client.key_value_set(key, "done")
        return result
    if log is not None:
        log(f"process {jax.process_index()}: waiting for process 0 to finish {name}")
    t0 = time.monotonic()
    while True:
        try:
            status = client.blocking_key_value_get(key, _WAIT_SLICE_MS)
            break
        except Exception as err:  # noqa: BLE001 - the runtime raises its own error type on a timeout
            if "DEADLINE_EXCEEDED" not in str(err) and "timed out" not in str(err).lower():
                raise DistributedError(f"lost process 0 while waiting for {name}: {err}") from None
            print(f"process {jax.process_index()}: still waiting for process 0 to finish {name} "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    if status != "done":
        raise PrimaryFailed(f"process 0 {status.replace('failed: ', 'failed ' + name + ': ', 1)}")
    return work()
