"""Where the suite keeps JAX's persistent compilation cache: one folder per CPU model under .cache/jax."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def host_cpu_fingerprint(cpuinfo: str | None = None) -> str:
    """A short hash of this CPU's model and instruction-set flags (from `cpuinfo`, /proc/cpuinfo's text, read when
    not given). XLA compiles CPU programs for the host's instruction set and JAX's cache key does not include it,
    so a checkout moved to another CPU model (a container on other hardware) must not load programs compiled for
    the first: each CPU gets its own folder. Lines that change while the machine runs (clock speed) are left out."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: the processor string is the best there is
            cpuinfo = platform.processor()
    kept = sorted({line for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("model name", "flags")})
    described = platform.machine() + ("".join(kept) if kept else cpuinfo)
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def cache_dir(repo: Path = REPO) -> Path:
    return repo / ".cache" / "jax" / host_cpu_fingerprint()
