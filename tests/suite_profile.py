"""Where the suite's time goes, per test: wall time, JAX compilation in the test process, CPU time of the
processes it started. Enabled by `DSV3_TEST_PROFILE=DIR` (conftest registers `SuiteProfile`); every pytest process
(each xdist worker) appends one JSON line per test to DIR/<worker>.jsonl, and `python tests/suite_profile.py DIR`
prints the per-file table of tests/README.md.

A test's kind is what dominates its wall time: `subprocess` when the CPU time of its child processes is at least
half of it (CLI end to end, multi-process, 8-device meshes), `compile` when tracing, lowering and XLA
compilation in the test process are, `run` otherwise (arithmetic, I/O, Python)."""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

# jax.monitoring's duration events that together make "compiling": trace to jaxpr, lower to MLIR, XLA backend
# compile (or the persistent cache's load, on a hit).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # only children that have ended and been waited for
    return usage.ru_utime + usage.ru_stime


def classify(wall_s: float, compile_s: float, children_cpu_s: float) -> str:
    """The kind of a test (or a file's total) from where its wall time went."""
    if children_cpu_s >= 0.5 * wall_s:
        return "subprocess"
    if compile_s >= 0.5 * wall_s:
        return "compile"
    return "run"


class SuiteProfile:
    """Pytest hooks: wrap setup, call and teardown of every test (module fixtures count to the first test that
    needs them, as in --durations)."""

    def __init__(self, directory: Path) -> None:
        import jax.monitoring  # conftest has set the environment by the time pytest configures its plugins

        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl"
        self.compile_seconds = 0.0
        self.start: tuple[float, float, float] | None = None
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, event: str, seconds: float, **_: object) -> None:
        if event in COMPILE_EVENTS:
            self.compile_seconds += seconds

    def pytest_runtest_protocol(self, item, nextitem):  # noqa: ARG002 - pytest's hook signature
        self.start = (time.perf_counter(), self.compile_seconds, _children_cpu_seconds())

    def pytest_runtest_logfinish(self, nodeid, location):  # noqa: ARG002
        if self.start is None:
            return
        t0, compile0, children0 = self.start
        record = {"nodeid": nodeid, "wall_s": round(time.perf_counter() - t0, 3),
                  "compile_s": round(self.compile_seconds - compile0, 3),
                  "children_cpu_s": round(_children_cpu_seconds() - children0, 3)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.start = None


def per_file_table(directory: Path) -> str:
    """A Markdown table of the records under `directory`: per file, tests, wall, compile and child-process
    seconds and the dominant kind, slowest first, with the totals."""
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            row = files[record["nodeid"].split("::")[0]]
            row[0] += 1
            row[1] += record["wall_s"]
            row[2] += record["compile_s"]
            row[3] += record["children_cpu_s"]
    lines = ["| file | tests | wall s | compiling s | child processes' CPU s | kind |", "|---|---|---|---|---|---|"]
    for name, (n, wall, comp, children) in sorted(files.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name} | {n} | {wall:.0f} | {comp:.0f} | {children:.0f} | {classify(wall, comp, children)} |")
    totals = [sum(row[i] for row in files.values()) for i in range(4)]
    lines.append(f"| all | {totals[0]:.0f} | {totals[1]:.0f} | {totals[2]:.0f} | {totals[3]:.0f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python tests/suite_profile.py DIR  (DIR: what DSV3_TEST_PROFILE=DIR wrote)")
    print(per_file_table(Path(sys.argv[1])))
