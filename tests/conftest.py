"""Shared test settings: deterministic hypothesis profile without per-example deadlines (JIT compiles)."""

import os

from hypothesis import settings

# Tests compile many small programs and run them a few times: XLA's backend optimisations cost more compile
# time than they save (measured: tiny train step compiles in 5.7 s instead of 14.4 s). Must be set before JAX
# initialises its backend, which happens on first use inside the test modules.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# The suite runs on CPU. Where the CUDA plugin is installed (requirements-gpu.txt, for the GPU compile tests) it
# must never start as a device backend: with no GPU it fails cuInit and is then unusable for AOT compilation.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Implicit rank promotion (adding a [D] vector to a [B, T, D] array without saying how) hides shape bugs: the
# suite, and every subprocess it starts, raises on it, so the code broadcasts explicitly.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

settings.register_profile("dsv3", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "40")),
                          derandomize=True, print_blob=True)
settings.load_profile("dsv3")
