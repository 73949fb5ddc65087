"""End to end through the CLI in subprocesses: train, SIGKILL mid-run, resume, and compare with an
uninterrupted run; eval of the latest checkpoint; corrupted-checkpoint fallback; bad arguments."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# Timing fields differ between runs by nature; everything else must be identical after a resume.
VOLATILE = {"tokens_per_s"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A small real-text corpus (a few stdlib modules as .txt) and a shared data/compile cache."""
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py", "textwrap.py", "string.py", "fractions.py", "statistics.py"):
        shutil.copy(stdlib / name, corpus / (name + ".txt"))
    return root


def _env(workdir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(workdir / "jax_cache")  # later runs reuse compiled steps
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    return env


def _train_cmd(workdir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv3_jax", "train", "--preset", "tiny", "--run-dir", str(run_dir),
            "--corpus", f"files:{workdir}/corpus/*.txt", "--no-progress",
            "--set", "model.vocab_size=512", "--set", f"train.steps={STEPS}", "--set", "train.checkpoint_every=5",
            "--set", "train.eval_every=10", "--set", f"data.cache_dir={workdir / 'data_cache'}", *extra]


def _run(cmd, workdir, timeout=600):
    return subprocess.run(cmd, cwd=REPO, env=_env(workdir), capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def reference_run(workdir) -> Path:
    run_dir = workdir / "uninterrupted"
    proc = _run(_train_cmd(workdir, run_dir), workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss curve:" in proc.stdout
    return run_dir


def test_uninterrupted_run_outputs(reference_run):
    records = _metrics(reference_run)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [10, 20]
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "maxvio_batch", "maxvio_batch_layers"):
        assert key in train[0], key
    assert {"val_loss", "maxvio_global", "expert_load"} <= set(evals[0])
    assert train[-1]["loss"] < train[0]["loss"]
    assert (reference_run / "loss.png").stat().st_size > 10_000
    assert any((reference_run / "tensorboard").iterdir())
    assert json.loads((reference_run / "config.json").read_text())["train"]["steps"] == STEPS
    # keep_checkpoints=3 of the tiny preset: only the newest three survive
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit()) == [10, 15, 20]


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(workdir, reference_run):
    run_dir = workdir / "killed"
    proc = subprocess.Popen(_train_cmd(workdir, run_dir), cwd=REPO, env=_env(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once a checkpoint exists and the run has moved past it
            if metrics.exists() and sum(1 for _ in metrics.open()) >= 13 and (run_dir / "checkpoints" / "10").exists():
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached step 12")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = _run(_train_cmd(workdir, run_dir), workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert _metrics(run_dir) == _metrics(reference_run)


def test_eval_command_reads_latest_checkpoint(workdir, reference_run):
    # the tiny preset evaluates on 2 validation batches during training; ask eval for the same
    proc = _run([sys.executable, "-m", "dsv3_jax", "eval", "--run-dir", str(reference_run), "--max-batches", "2"],
                workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    last_eval = [r for r in _metrics(reference_run) if r["kind"] == "eval"][-1]
    assert out["step"] == STEPS
    assert out["val_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-6)
    assert out["maxvio_global"] == pytest.approx(last_eval["maxvio_global"], rel=1e-6)


def test_corrupted_latest_checkpoint_falls_back(workdir, reference_run):
    run_dir = workdir / "corrupted"
    shutil.copytree(reference_run, run_dir)
    latest = run_dir / "checkpoints" / "20"
    for path in latest.rglob("*"):  # damage every data file of the newest checkpoint
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(b"\0garbage")
    proc = _run([sys.executable, "-m", "dsv3_jax", "eval", "--run-dir", str(run_dir)], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not be restored" in proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["step"] == 15


@pytest.mark.parametrize("args,message", [
    (["--set", "model.topk_group=9"], "topk_group"),
    (["--set", "train.stepz=3"], "stepz"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--corpus", "files:/nonexistent/*.txt"], "nonexistent"),
])
def test_bad_arguments_fail_fast_with_a_clear_message(workdir, args, message):
    run_dir = workdir / "bad"
    proc = _run(_train_cmd(workdir, run_dir, *args), workdir, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_changed_config_on_existing_run_is_refused(workdir, reference_run):
    proc = _run(_train_cmd(workdir, reference_run, "--set", "train.peak_lr=0.5"), workdir, timeout=300)
    assert proc.returncode != 0
    assert "peak_lr" in proc.stderr
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir() if p.name.isdigit()) == [10, 15, 20]


def test_divergence_stops_the_run_without_writing_bad_checkpoints(workdir):
    run_dir = workdir / "diverged"
    proc = _run(_train_cmd(workdir, run_dir, "--set", "train.peak_lr=1e30", "--set", "train.warmup_frac=0.0",
                           "--set", "train.max_consecutive_nonfinite=3"), workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "consecutive steps had a non-finite loss or gradient" in proc.stderr
    records = _metrics(run_dir)
    assert [r["skipped"] for r in records if r["kind"] == "train"][-3:] == [1, 1, 1]
    # whatever was checkpointed before the divergence (step 5 at most) restores and holds finite values
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) \
        if (run_dir / "checkpoints").exists() else []
    assert all(s <= 5 for s in steps)
