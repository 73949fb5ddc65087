"""Shared helpers of the end-to-end CLI tests: subprocess environment, a small real-text corpus, run records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Timing fields differ between runs by nature; everything else must be identical after a resume.
VOLATILE = {"tokens_per_s"}


def cli_env(root: Path) -> dict:
    """Environment of a CLI subprocess: the repository importable, compiled programs cached (in the suite's cache,
    tests/conftest.py, or else under `root`) so that later runs reuse compiled steps."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def run_cli(args: list[str], root: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m dsv3_jax ARGS` to completion, output captured."""
    return subprocess.run([sys.executable, "-m", "dsv3_jax", *args], cwd=REPO, env=cli_env(root),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], root: Path) -> subprocess.Popen:
    """`python -m dsv3_jax ARGS` in the background, stderr captured (read it after the process ends)."""
    return subprocess.Popen([sys.executable, "-m", "dsv3_jax", *args], cwd=REPO, env=cli_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_together(commands: list[list[str]], env: dict, timeout: float = 600) -> list[tuple[int, str, str]]:
    """Start every command at once (the processes of one jax.distributed job), wait for all: (returncode,
    stdout, stderr) each. Any still running at the timeout are killed."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def stdlib_corpus(directory: Path, names: tuple[str, ...]) -> Path:
    """A few standard-library modules copied as .txt files: real text that every Python ships."""
    directory.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in names:
        shutil.copy(stdlib / name, directory / (name + ".txt"))
    return directory


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Step numbers under RUN/checkpoints (empty if there is none)."""
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def tree_snapshot(root: Path, ignore: tuple[str, ...] = ("LOCK",)) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `root` but the lock file (whose holder record every trainer
    rewrites): equal snapshots mean nothing of the run was written or removed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ignore}
