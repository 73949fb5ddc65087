"""Where the suite keeps JAX's persistent compilation cache: one folder per CPU model under .cache/jax."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def host_cpu_fingerprint() -> str:
    """A short hash of this CPU's model and instruction-set flags. XLA compiles CPU programs for the host's
    instruction set and JAX's cache key does not include it, so a checkout moved to another CPU model (a
    container on other hardware) must not load programs compiled for the first: each CPU gets its own folder."""
    described = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        described += "".join(sorted({line for line in lines if line.split(":")[0].strip() in ("model name", "flags")}))
    except OSError:  # not Linux: the processor string is the best there is
        described += platform.processor()
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def cache_dir(repo: Path = REPO) -> Path:
    return repo / ".cache" / "jax" / host_cpu_fingerprint()
