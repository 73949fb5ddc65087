"""The suite's own machinery (tests/README.md): the environment every process inherits, the compilation cache's
folder, the order in which workers take the files, and the per-test profile's arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import conftest
import pytest
from compile_cache import REPO, cache_dir, host_cpu_fingerprint
from suite_profile import classify, per_file_table


def test_every_process_the_suite_starts_inherits_the_cache_and_flags():
    probe = ("import jax, json, os; print(json.dumps({'dir': jax.config.jax_compilation_cache_dir, "
             "'min_time': jax.config.jax_persistent_cache_min_compile_time_secs, "
             "'min_size': jax.config.jax_persistent_cache_min_entry_size_bytes, "
             "'flags': os.environ.get('XLA_FLAGS', '')}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out)
    assert seen["dir"] == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert seen["min_time"] == 0 and seen["min_size"] == -1
    assert "--xla_backend_optimization_level=0" in seen["flags"]
    assert "--xla_cpu_use_fusion_emitters=false" in seen["flags"]


def test_cache_folder_changes_with_the_cpu_model_and_flags_only():
    cpu = "processor\t: {n}\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\nflags\t\t: fpu sse2 {extra}\n"
    fingerprint = lambda **kw: host_cpu_fingerprint("".join(cpu.format(n=n, **kw) for n in range(2)))  # noqa: E731
    base = fingerprint(model="Xeon", mhz="2100.0", extra="avx2")
    assert fingerprint(model="Xeon", mhz="3400.5", extra="avx2") == base  # the clock moves while it runs
    assert fingerprint(model="EPYC", mhz="2100.0", extra="avx2") != base
    assert fingerprint(model="Xeon", mhz="2100.0", extra="avx2 avx512f") != base
    assert cache_dir().parent == REPO / ".cache" / "jax" and cache_dir().name == host_cpu_fingerprint()


def test_cache_folder_is_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(cache_dir() / "entry")], cwd=REPO)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, ".cache/ must be ignored by git"


def test_slowest_first_names_files_that_exist_once_each():
    """A renamed or deleted file would silently fall out of the schedule's head."""
    assert len(set(conftest.SLOWEST_FIRST)) == len(conftest.SLOWEST_FIRST)
    for name in conftest.SLOWEST_FIRST:
        assert (REPO / name).is_file(), name


def test_collection_puts_the_slowest_files_first_and_keeps_the_rest_in_order():
    class Item:
        def __init__(self, nodeid: str):
            self.nodeid = nodeid

    names = ["tests/test_aot.py::a", "tests/test_multihost.py::x", "tests/test_config.py::b",
             "tests/test_train_e2e.py::y", "tests/test_multihost.py::z", "tests/test_aot.py::c"]
    items = [Item(n) for n in names]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.nodeid for i in items] == ["tests/test_train_e2e.py::y", "tests/test_multihost.py::x",
                                         "tests/test_multihost.py::z", "tests/test_aot.py::a",
                                         "tests/test_config.py::b", "tests/test_aot.py::c"]


@pytest.mark.parametrize("wall,compile_s,children,kind", [
    (10.0, 1.0, 6.0, "subprocess"), (10.0, 6.0, 1.0, "compile"), (10.0, 4.9, 4.9, "run"), (10.0, 5.0, 5.0,
                                                                                              "subprocess")])
def test_a_test_is_classified_by_what_dominates_its_time(wall, compile_s, children, kind):
    assert classify(wall, compile_s, children) == kind


def test_per_file_table_sums_each_files_tests_over_workers(tmp_path):
    records = {"gw0": [("tests/test_a.py::one", 2.0, 1.5, 0.0), ("tests/test_b.py::one", 9.0, 0.0, 8.0)],
               "gw1": [("tests/test_a.py::two", 1.0, 0.5, 0.0)]}
    for worker, rows in records.items():
        (tmp_path / f"{worker}.jsonl").write_text("".join(
            json.dumps({"nodeid": n, "wall_s": w, "compile_s": c, "children_cpu_s": ch}) + "\n" for n, w, c, ch in rows))
    lines = per_file_table(tmp_path).splitlines()
    assert lines[2] == "| tests/test_b.py | 1 | 9 | 0 | 8 | subprocess |"  # slowest first
    assert lines[3] == "| tests/test_a.py | 2 | 3 | 2 | 0 | compile |"
    assert lines[4] == "| all | 3 | 12 | 2 | 8 | |"
