"""Shared test settings: deterministic hypothesis profile without per-example deadlines (JIT compiles)."""

import os

from hypothesis import settings

settings.register_profile("dsv3", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "40")),
                          derandomize=True, print_blob=True)
settings.load_profile("dsv3")
