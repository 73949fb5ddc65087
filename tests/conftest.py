"""Shared test settings: the environment of the suite and of every process it starts (XLA flags, the persistent
compilation cache, threads per worker), the order in which the two xdist workers take the work, a deterministic
hypothesis profile without per-example deadlines (JIT compiles), and the optional per-test profile."""

import json
import os
from pathlib import Path

from compile_cache import cache_dir
from hypothesis import settings

# The user's own values of what the suite changes, recorded by the first process that loads this file: xdist
# workers inherit the controller's environment, already changed.
os.environ.setdefault("DSV3_TESTS_USER_ENVIRONMENT", json.dumps(
    {name: os.environ.get(name) for name in ("XLA_FLAGS", "JAX_NUMPY_RANK_PROMOTION")}))
_USER_ENVIRONMENT = json.loads(os.environ["DSV3_TESTS_USER_ENVIRONMENT"])


def _append_xla_flag(flag: str) -> None:
    name = flag.split("=")[0]
    if name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


# Everything below is set in os.environ, before JAX is imported (by the test modules), so it applies to this
# process and to every process a test starts (CLI runs, 8-device meshes, notebook kernels), which inherit it.

# Tests compile many small programs and run them a few times: XLA's backend optimisations cost more compile
# time than they save (measured: tiny train step compiles in 5.7 s instead of 14.4 s).
_append_xla_flag("--xla_backend_optimization_level=0")
# XLA:CPU's legacy elemental emitters instead of its newer MLIR fusion emitters: the same programs compile
# ~40% faster (measured: tests/test_stack.py + test_mha.py 65.8 s -> 40.0 s, cold cache). What users run keeps
# XLA's defaults; the notebooks, which run with the user's flags, exercise those.
_append_xla_flag("--xla_cpu_use_fusion_emitters=false")

# Compiled programs persist across tests, worker processes, subprocesses and runs: the suite compiles the same
# tiny training step in many processes. The cache key is a hash of the program, the XLA flags, the compile
# options, the backend and jax/jaxlib versions, so a changed program or flag compiles afresh: a cached entry can
# only ever stand for the very program that would have been compiled (CI starts from a clean clone, cold).
# Thresholds at their minimum: on CPU nearly every program compiles in well under JAX's default 1 s. No size
# bound: with one, JAX lists the whole folder on every write (measured: the suite ran 3-7x slower at ~10k
# entries). Two processes may write one entry at once; a reader that meets a half-written file gets a warning
# from JAX and compiles the program itself.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir()))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# Under pytest-xdist every worker has a core of its own: XLA's Eigen thread pool would otherwise run each
# worker's matmuls on both cores and the two workers would fight for them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _append_xla_flag("--xla_cpu_multi_thread_eigen=false")

# The suite runs on CPU. Where the CUDA plugin is installed (requirements-gpu.txt, for the GPU compile tests) it
# must never start as a device backend: with no GPU it fails cuInit and is then unusable for AOT compilation.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Implicit rank promotion (adding a [D] vector to a [B, T, D] array without saying how) hides shape bugs: the
# suite, and every subprocess it starts, raises on it, so the code broadcasts explicitly.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

settings.register_profile("dsv3", deadline=None, max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "40")),
                          derandomize=True, print_blob=True)
settings.load_profile("dsv3")

# `make test` runs pytest-xdist with `--dist loadfile`: each test file is one unit of work that one worker runs in
# order, so a module's fixtures (a trained run, an 8-device report) are built once. Workers take units in
# collection order: the slowest files (measured cold, `DSV3_TEST_PROFILE`, tests/README.md) go first, so that the
# two workers finish together instead of one starting a two-minute file while the other has nothing left.
SLOWEST_FIRST = (
    "tests/test_train_e2e.py",
    "tests/test_multihost.py",
    "tests/test_fp8.py",
    "tests/test_generate.py",
    "notebooks/04_generate.ipynb",
    "tests/test_sharding.py",
    "tests/test_train_step.py",
    "tests/test_stack.py",
    "tests/test_plan.py",
    "tests/test_moe.py",
    "tests/test_given_tokenizer.py",
    "tests/test_generate_cli.py",
    "tests/test_convert.py",
    "tests/test_model.py",
    "tests/test_parity_hf.py",
    "notebooks/02_moe_routing.ipynb",
    "tests/test_moe_ragged.py",
    "tests/test_mha.py",
)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep order


class NotebooksRunAsUsersDo:
    """The notebooks run as a user runs them: with the user's XLA flags (XLA's optimisations on: the notebooks
    compute more than they compile) and JAX's default rank promotion, which their kernels would otherwise
    inherit from this process. They share the compilation cache."""

    suite_environment: dict[str, str | None] = {}

    def pytest_runtest_setup(self, item):
        if item.path.suffix == ".ipynb":
            self.suite_environment = {name: os.environ.get(name) for name in _USER_ENVIRONMENT}
            _set_environment(_USER_ENVIRONMENT)

    def pytest_runtest_teardown(self, item):
        if item.path.suffix == ".ipynb":
            _set_environment(self.suite_environment)


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_configure(config):
    # Registered as plugins rather than written as conftest hooks: those would only see the items under tests/.
    config.pluginmanager.register(NotebooksRunAsUsersDo(), "dsv3_notebook_environment")
    if os.environ.get("DSV3_TEST_PROFILE"):
        from suite_profile import SuiteProfile

        config.pluginmanager.register(SuiteProfile(Path(os.environ["DSV3_TEST_PROFILE"])), "dsv3_suite_profile")
