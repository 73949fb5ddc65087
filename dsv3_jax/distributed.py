"""Multi-process (multi-host) runs: join the JAX cluster before anything touches a device.

Every process runs the same command. With explicit flags (`--coordinator host:port --num-processes N
--process-id I`) any cluster works, CPU processes on one machine included; with none, JAX reads the cluster's
environment (Cloud TPU slices, SLURM, Open MPI, Kubernetes JobSets). After `initialize`, `jax.devices()` lists
every process's devices, so the default mesh spans the whole cluster; each process feeds its rows of every
global batch (see `MeshPlan.process_batch_slice`), process 0 writes logs and metrics, and all processes
write their shards of each checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import jax

from dsv3_jax.config import ConfigError


class DistributedError(RuntimeError):
    """Could not join (or find) the cluster."""


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
