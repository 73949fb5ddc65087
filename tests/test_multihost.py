"""Two processes x 4 fake CPU devices (jax.distributed over localhost) train the tiny preset through the CLI and
match one process with 8 devices; a checkpoint the two processes wrote resumes in one process on another mesh.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from cli_support import cli_env, run_together

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
COMPARED = ("loss", "mtp_loss", "balance_loss", "maxvio_batch", "lr", "skipped")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multihost")
    (root / "corpus").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py", "textwrap.py", "string.py", "fractions.py", "statistics.py"):
        shutil.copy(stdlib / name, root / "corpus" / (name + ".txt"))
    return root


def _env(workdir: Path, devices: int) -> dict:
    """The CLI tests' environment (the resume reuses the reference's compiled programs) with `devices` CPU devices."""
    env = cli_env(workdir)
    flags = [f for f in env["XLA_FLAGS"].split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


def _train(workdir: Path, run_dir: Path, mesh: tuple[int, int, int], *extra: str) -> list[str]:
    data, expert, tensor = mesh
    return [sys.executable, "-m", "dsv3_jax", "train", "--preset", "tiny", "--run-dir", str(run_dir),
            "--corpus", f"files:{workdir}/corpus/*.txt", "--no-progress", "--set", "model.vocab_size=512",
            "--set", "model.num_hidden_layers=2",  # one dense + one MoE layer + the MTP block: compile time
            "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=3", "--set", f"train.eval_every={STEPS}",
            "--set", "train.eval_batches=1", "--set", f"data.cache_dir={workdir / 'data_cache'}",
            "--set", f"mesh.data={data}", "--set", f"mesh.expert={expert}", "--set", f"mesh.tensor={tensor}", *extra]


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["kind"] == kind]


def _assert_close(a: list[dict], b: list[dict], keys, tol=1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], abs=tol, rel=tol), (ra["step"], key, ra[key], rb[key])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """One process, 8 devices, mesh (data, expert, tensor) = (2, 2, 2); also prepares the data cache."""
    run_dir = workdir / "one_process"
    proc = subprocess.run(_train(workdir, run_dir, (2, 2, 2)), cwd=REPO, env=_env(workdir, 8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mesh data=2 expert=2 tensor=2 over 8 devices, 1 process" in proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def two_processes(workdir, reference) -> Path:
    """Two processes with 4 devices each, on another mesh: (1, 4, 2)."""
    run_dir = workdir / "two_processes"
    port = _free_port()
    results = run_together([_train(workdir, run_dir, (1, 4, 2), "--distributed", "--coordinator",
                                   f"localhost:{port}", "--num-processes", "2", "--process-id", str(i))
                            for i in range(2)], _env(workdir, 4))
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"process {i}:\n{err[-4000:]}"
    outputs = [(out, err) for _, out, err in results]
    assert "mesh data=1 expert=4 tensor=2 over 8 devices, 2 processes" in outputs[0][1]
    assert "loss curve:" in outputs[0][0] and "loss curve:" not in outputs[1][0]  # only process 0 writes
    return run_dir


def test_two_processes_match_one_process(reference, two_processes):
    assert [r["step"] for r in _records(two_processes, "train")] == list(range(1, STEPS + 1))
    _assert_close(_records(two_processes, "train"), _records(reference, "train"), COMPARED)
    _assert_close(_records(two_processes, "train"), _records(reference, "train"), ("grad_norm",), tol=3e-5)
    _assert_close(_records(two_processes, "eval"), _records(reference, "eval"), ("val_loss", "maxvio_global"))
    steps = sorted(int(p.name) for p in (two_processes / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(workdir, reference, two_processes):
    """Written by 2 processes on (1, 4, 2), resumed by 1 process on (2, 2, 2) with the data iterator: the run
    continues like the uninterrupted reference. Only --set mesh.* is given: the saved config is reused."""
    run_dir = workdir / "resumed"
    shutil.copytree(two_processes, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    cmd = [sys.executable, "-m", "dsv3_jax", "train", "--run-dir", str(run_dir), "--no-progress",
           "--set", "mesh.data=2", "--set", "mesh.expert=2", "--set", "mesh.tensor=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(workdir, 8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming" in proc.stderr and "from step 3" in proc.stderr
    resumed = _records(run_dir, "train")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    _assert_close(resumed[3:], _records(reference, "train")[3:], COMPARED)
    _assert_close(_records(run_dir, "eval"), _records(reference, "eval"), ("val_loss", "maxvio_global"))


_PRIMARY_FIRST = """
import json, sys
import jax
port, pid, pattern, cache, mode = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", 2, int(pid), initialization_timeout=120)
from dsv3_jax import distributed
from dsv3_jax.data import prepare_data

def work():
    if mode == "fail" and jax.process_index() == 0:
        raise ValueError("the corpus is unreadable")
    return prepare_data(f"files:{pattern}", 300, 15, 0, cache, workers=1)

try:
    data = distributed.primary_first(work, "preparing the data", log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"directory": str(data.directory), "train_windows": data.train.n_windows}))
except (ValueError, distributed.DistributedError) as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
"""


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_process_0_prepares_the_data_once_and_the_other_waits_for_it(workdir, tmp_path, mode):
    """Two processes share a cache: process 0 trains the tokenizer and writes the windows while process 1 waits
    on a marker, then reads them; if process 0 fails, process 1 raises its error instead of waiting forever."""
    script = tmp_path / "primary_first.py"
    script.write_text(_PRIMARY_FIRST)
    port, cache = _free_port(), tmp_path / "cache"
    env = dict(_env(workdir, 1), JAX_PLATFORMS="cpu")
    done = run_together([[sys.executable, str(script), str(port), str(i), f"{workdir}/corpus/*.txt", str(cache),
                          mode] for i in range(2)], env, timeout=300)
    outputs = [(out, err) for _, out, err in done]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert "process 1: waiting for process 0 to finish preparing the data" in outputs[1][1]
    if mode == "fail":
        assert results[0] == {"error": "ValueError: the corpus is unreadable"}
        assert results[1] == {"error": "PrimaryFailed: process 0 failed preparing the data: ValueError: the corpus "
                                       "is unreadable"}
        return
    assert results[0] == results[1] and results[0]["train_windows"] > 0
    assert "byte-level BPE, trained" in outputs[0][1] and "byte-level BPE, cached" in outputs[1][1]
