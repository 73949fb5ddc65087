"""End to end through the CLI in subprocesses: train, SIGKILL mid-run, resume, and compare with an
uninterrupted run; eval of the latest checkpoint; bad arguments; run-directory safety (SIGINT/SIGTERM stops,
a broken newest checkpoint, unrestorable runs, the lock, a changed corpus), all on one reference run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import (REPO, checkpoint_steps, cli_env, metrics, run_cli, start_cli, stdlib_corpus,
                         tree_snapshot)

STEPS = 20
CORPUS_FILES = ("argparse.py", "dataclasses.py", "textwrap.py", "string.py", "fractions.py", "statistics.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A small real-text corpus (a few stdlib modules as .txt) and a shared data/compile cache."""
    root = tmp_path_factory.mktemp("e2e")
    stdlib_corpus(root / "corpus", CORPUS_FILES)
    return root


def _train_args(workdir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--run-dir", str(run_dir), "--corpus", f"files:{workdir}/corpus/*.txt",
            "--no-progress", "--set", f"train.steps={STEPS}",  # the tiny preset as it is (vocab 304)
            "--set", "train.checkpoint_every=5", "--set", "train.eval_every=10",
            "--set", f"data.cache_dir={workdir / 'data_cache'}", *extra]


def _train_cmd(workdir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv3_jax", *_train_args(workdir, run_dir, *extra)]


@pytest.fixture(scope="module")
def reference_run(workdir) -> Path:
    run_dir = workdir / "uninterrupted"
    proc = run_cli(_train_args(workdir, run_dir), workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss curve:" in proc.stdout
    return run_dir


def test_uninterrupted_run_outputs(reference_run):
    records = metrics(reference_run)
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
    assert checkpoint_steps(reference_run) == [10, 15, 20]
    assert json.loads((reference_run / "data.json").read_text())["tokenizer_hash"]  # the run carries its data record
    assert (reference_run / "tokenizer.json").is_file()


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(workdir, reference_run):
    run_dir = workdir / "killed"
    proc = subprocess.Popen(_train_cmd(workdir, run_dir), cwd=REPO, env=cli_env(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once a checkpoint exists and the run has moved past it
            if log.exists() and sum(1 for _ in log.open()) >= 13 and (run_dir / "checkpoints" / "10").exists():
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
    resumed = run_cli(_train_args(workdir, run_dir), workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert metrics(run_dir) == metrics(reference_run)


def test_eval_command_reads_latest_checkpoint(workdir, reference_run):
    # the tiny preset evaluates on 2 validation batches during training; ask eval for the same
    proc = run_cli(["eval", "--run-dir", str(reference_run), "--max-batches", "2"],
                workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    last_eval = [r for r in metrics(reference_run) if r["kind"] == "eval"][-1]
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
    proc = run_cli(["eval", "--run-dir", str(run_dir)], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint 20 does not restore" in proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["step"] == 15


@pytest.mark.parametrize("args,message", [
    (["--set", "model.topk_group=9"], "topk_group"),
    (["--set", "train.stepz=3"], "stepz"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--corpus", "files:/nonexistent/*.txt"], "nonexistent"),
    (["--set", "model.remat=sometimes"], "model.remat"),
    (["--set", "train.grad_accum=3"], "train.grad_accum"),  # does not divide the tiny preset's batch of 8
    (["--profile", "5"], "--profile"),
])
def test_bad_arguments_fail_fast_with_a_clear_message(workdir, args, message):
    run_dir = workdir / "bad"
    proc = run_cli(_train_args(workdir, run_dir, *args), workdir, 120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_resuming_in_the_other_layout_is_refused_naming_both(workdir, reference_run):
    run_dir = workdir / "layout"
    shutil.copytree(reference_run, run_dir)
    before = tree_snapshot(run_dir)
    proc = run_cli(_train_args(workdir, run_dir, "--set", "model.scan_layers=false"), workdir, 300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "scanned layers" in proc.stderr and "unrolled layers" in proc.stderr
    assert "--set model.scan_layers=true" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_snapshot(run_dir) == before


def test_remat_accumulation_and_profile_through_the_cli(workdir):
    """A fresh run with full remat and two microbatches per step trains, and --profile leaves a trace of two
    steps in the run directory."""
    run_dir = workdir / "remat_accum"
    proc = run_cli(_train_args(workdir, run_dir, "--set", "train.steps=4", "--set", "model.remat=full",
                               "--set", "train.grad_accum=2", "--profile", "1:2"), workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "profile of steps 2..3 written to" in proc.stderr
    traces = list((run_dir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    records = [r for r in metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(r["skipped"] == 0 for r in records)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["remat"] == "full" and saved["train"]["grad_accum"] == 2


def test_changed_config_on_existing_run_is_refused(workdir, reference_run):
    proc = run_cli(_train_args(workdir, reference_run, "--set", "train.peak_lr=0.5"), workdir, 300)
    assert proc.returncode != 0
    assert "peak_lr" in proc.stderr
    assert checkpoint_steps(reference_run) == [10, 15, 20]


def test_divergence_stops_the_run_without_writing_bad_checkpoints(workdir):
    run_dir = workdir / "diverged"
    proc = run_cli(_train_args(workdir, run_dir, "--set", "train.peak_lr=1e30", "--set", "train.warmup_frac=0.0",
                           "--set", "train.max_consecutive_nonfinite=3"), workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "consecutive steps had a non-finite loss or gradient" in proc.stderr
    records = metrics(run_dir)
    assert [r["skipped"] for r in records if r["kind"] == "train"][-3:] == [1, 1, 1]
    # whatever was checkpointed before the divergence (step 5 at most) restores and holds finite values
    assert all(s <= 5 for s in checkpoint_steps(run_dir))


# ---- run-directory safety: nothing lost, nothing silent -------------------------------------------------------
def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until metrics.jsonl holds a train record of `step` (fails if the process ends first)."""
    path, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()
                                 if line.strip().endswith("}")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"the run never reached step {step}")


def _no_debris(run_dir: Path) -> None:
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()
                 and p.name not in ("_CHECKPOINT_METADATA", "descriptor", "_ROOT_METADATA")]
    assert not leftovers, leftovers
    for step in checkpoint_steps(run_dir):  # every step directory is complete
        assert (run_dir / "checkpoints" / str(step) / "state" / "_METADATA").is_file(), step


def test_sigterm_and_sigint_stop_cleanly_and_resume_exactly(workdir, reference_run):
    run_dir = workdir / "signalled"
    for signum, at_step, code in ((signal.SIGTERM, 7, 143), (signal.SIGINT, 13, 130)):
        proc = start_cli(_train_args(workdir, run_dir), workdir)
        try:
            _wait_for_step(run_dir, at_step, proc)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == code, err[-2000:]
        assert "Traceback" not in err and "ERROR" not in err, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"stopped by {signal.Signals(signum).name} after step ") and \
            f"resume with: python -m dsv3_jax train --run-dir {run_dir}" in last, last
        stopped_at = int(last.split("after step ")[1].split()[0])
        assert stopped_at >= at_step and checkpoint_steps(run_dir)[-1] == stopped_at  # the stop step was saved
        _no_debris(run_dir)
    resumed = run_cli(_train_args(workdir, run_dir), workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics(run_dir) == metrics(reference_run)


def test_corrupt_newest_checkpoint_is_set_aside_and_its_steps_redone(workdir, reference_run):
    run_dir = workdir / "newest_corrupt"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "checkpoints" / "20" / "meta" / "metadata").write_text("")
    proc = run_cli(_train_args(workdir, run_dir), workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint 20 does not restore (unreadable metadata" in proc.stderr and "from step 15" in proc.stderr
    broken = list((run_dir / "checkpoints_broken").iterdir())
    assert [p.name.split("-")[0] for p in broken] == ["20"]  # kept, not deleted
    assert checkpoint_steps(run_dir) == [10, 15, 20]  # step 20 recomputed and saved again
    assert metrics(run_dir) == metrics(reference_run)  # redone records replace the old ones...
    discarded = [json.loads(line) for line in (run_dir / "metrics.discarded.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in discarded}) == list(range(16, 21))  # ...which are kept aside
    ev = run_cli(["eval", "--run-dir", str(run_dir), "--max-batches", "1"], workdir)
    assert ev.returncode == 0 and json.loads(ev.stdout[ev.stdout.index("{"):])["step"] == 20, ev.stderr[-2000:]
    assert "does not restore" not in ev.stderr


@pytest.mark.parametrize("damage,message", [
    ("metadata", "no checkpoint in"),  # every checkpoint's metadata emptied
    ("config", "model.hidden_size: saved 32, now 48"),  # config.json edited by hand to another architecture
])
def test_unrestorable_run_is_refused_and_nothing_changes(workdir, reference_run, damage, message):
    run_dir = workdir / f"refused_{damage}"
    shutil.copytree(reference_run, run_dir)
    if damage == "metadata":
        for step in checkpoint_steps(run_dir):
            (run_dir / "checkpoints" / str(step) / "meta" / "metadata").write_text("")
    else:
        config = json.loads((run_dir / "config.json").read_text())
        config["model"]["hidden_size"] = 48
        (run_dir / "config.json").write_text(json.dumps(config))
    before = tree_snapshot(run_dir)
    proc = run_cli(["train", "--run-dir", str(run_dir), "--no-progress"], workdir, 300)  # resume as saved
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    if damage == "metadata":
        assert all(f"step {s}: unreadable metadata" in errors[0] for s in (10, 15, 20))
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
    assert tree_snapshot(run_dir) == before


def test_a_second_trainer_is_refused_while_the_run_dir_is_locked(workdir, reference_run):
    from dsv3_jax.rundir import RunLock

    run_dir = workdir / "locked"
    shutil.copytree(reference_run, run_dir)
    before = tree_snapshot(run_dir)
    with RunLock(run_dir):  # held by this (pytest) process, as a running trainer would
        proc = run_cli(_train_args(workdir, run_dir), workdir, 300)
        holder = (run_dir / "LOCK").read_text()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"in use by another training run: pid {os.getpid()}" in proc.stderr and "--break-lock" in proc.stderr
    assert json.loads(holder)["pid"] == os.getpid()
    assert tree_snapshot(run_dir) == before


def test_changed_corpus_is_named_by_eval_and_refused_by_resume(workdir, reference_run):
    run_dir = workdir / "corpus_changed"
    shutil.copytree(reference_run, run_dir)
    extra = stdlib_corpus(workdir / "corpus", ("heapq.py",)) / "heapq.py.txt"
    try:
        ev = run_cli(["eval", "--run-dir", str(run_dir), "--max-batches", "1"], workdir)
        resume = run_cli(_train_args(workdir, run_dir), workdir, 300)
    finally:
        extra.unlink()
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "has changed on disk since the run trained on it" in ev.stderr
    assert "the run's own" in ev.stderr  # encoded with the run's tokenizer, not a retrained one
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["corpus_changed"] is True
    assert resume.returncode == 2 and "cannot resume" in resume.stderr, resume.stderr[-2000:]
    assert checkpoint_steps(run_dir) == [10, 15, 20]
