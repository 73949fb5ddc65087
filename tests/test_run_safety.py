"""Run-directory safety pieces on their own: the lock, metrics truncation, checkpoint layout checks,
fallback with set-aside, the signal handler and the run's data record. (The CLI end to end: test_train_e2e.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import rundir
from dsv3_jax.checkpoint import NoRestorableCheckpoint, RunCheckpointer, layout_mismatch
from dsv3_jax.train.config import read_run_config
from dsv3_jax.train.interrupt import StopSignals, TrainingInterrupted
from dsv3_jax.train.metrics import discarded_path, truncate_after

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the lock -------------------------------------------------------------------------------------------------
def _hold_lock_in_subprocess(run_dir) -> subprocess.Popen:
    """Another process holding the lock, as a running trainer would (it prints 'locked' once it holds it)."""
    code = ("import sys, time; from dsv3_jax.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_excludes_another_process_and_is_released_when_it_dies(tmp_path):
    holder = _hold_lock_in_subprocess(tmp_path)
    try:
        with pytest.raises(rundir.RunDirLocked, match=f"pid {holder.pid} on host .*--break-lock"):
            rundir.RunLock(tmp_path).acquire()
        with pytest.raises(rundir.RunDirLocked, match="held by a live process"):
            rundir.break_lock(tmp_path)  # a live holder's lock is never broken
    finally:
        holder.kill()
        holder.wait()
    with rundir.RunLock(tmp_path):  # the kernel released the dead holder's lock: no stale lock
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()


def test_lock_is_taken_once_even_within_a_process_and_release_clears_it(tmp_path):
    with rundir.locked(tmp_path):
        with pytest.raises(rundir.RunDirLocked, match=f"pid {os.getpid()}"):
            with rundir.locked(tmp_path):
                pass
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()  # still held
    assert (tmp_path / "LOCK").read_text() == ""  # released: the holder record is cleared, the file stays
    with rundir.locked(tmp_path, enabled=False) as lock:
        assert lock is None


def test_pid_file_fallback_takes_over_a_dead_local_holder_and_refuses_a_foreign_one(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")  # ENOSYS: a file system without flock
    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": rundir.socket.gethostname(), "started": time.time()}
    (tmp_path / "LOCK").write_text(json.dumps(record))
    with rundir.RunLock(tmp_path):  # that pid no longer runs on this host: taken over
        pass
    (tmp_path / "LOCK").write_text(json.dumps({**record, "host": "another-host"}))
    with pytest.raises(rundir.RunDirLocked, match="on host another-host"):
        rundir.RunLock(tmp_path).acquire()
    assert rundir.break_lock(tmp_path).startswith(f"pid {record['pid']} on host another-host")
    assert not (tmp_path / "LOCK").exists()
    with rundir.RunLock(tmp_path):
        pass


# ---- metrics --------------------------------------------------------------------------------------------------
def test_truncate_after_moves_redone_and_cut_records_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')  # the last line was cut by a crash
    assert truncate_after(str(path), 2) == 3
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert open(discarded_path(str(path))).read() == "\n".join(lines[2:]) + '\n{"kind": "train", "st\n'
    assert truncate_after(str(path), 2) == 0  # idempotent
    assert truncate_after(str(path), 0) == 2  # a fresh start keeps nothing in metrics.jsonl, loses nothing
    assert path.read_text() == "" and len(open(discarded_path(str(path))).read().splitlines()) == 5


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _state(scale: float = 1.0, width: int = 3) -> dict:
    return {"params": {"w": jnp.full((2, width), scale, jnp.float32)}, "step": jnp.int32(7)}


def _abstract(width: int = 3) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(width=width))


def _save(run_dir, steps, config=None, **kwargs) -> None:
    ckpt = RunCheckpointer(run_dir, keep=5)
    for step in steps:
        ckpt.save(step, _state(float(step), **kwargs), {"grain": {"next_index": step}}, config or {"model": {"a": 1}})
    ckpt.close()


def test_layout_mismatch_names_the_tensor_and_the_shapes():
    assert layout_mismatch(_abstract(), _abstract()) is None
    message = layout_mismatch(_abstract(3), _abstract(4))
    assert "params/w: saved (2, 3) float32, expected (2, 4) float32" in message
    missing = layout_mismatch({"step": _abstract()["step"]}, _abstract())
    assert "1 arrays missing from the checkpoint (e.g. params/w)" in missing


def test_restore_falls_back_with_reasons_and_set_aside_keeps_the_broken_steps(tmp_path):
    _save(tmp_path, [1, 2, 3])
    (tmp_path / "checkpoints" / "3" / "meta" / "metadata").write_text("")
    ckpt = RunCheckpointer(tmp_path, keep=5)
    restored = ckpt.restore_latest(_abstract())
    assert restored.step == 2 and float(restored.state["params"]["w"][0, 0]) == 2.0
    assert [step for step, _ in restored.skipped] == [3] and "unreadable metadata" in restored.skipped[0][1]
    moved = ckpt.set_aside([3])
    assert ckpt.steps() == [1, 2] and os.path.isdir(moved[0]) and "checkpoints_broken" in moved[0]
    ckpt.save(3, _state(30.0), {"grain": {"next_index": 3}}, {"model": {"a": 1}})  # step 3 can be saved again
    ckpt.close()
    assert RunCheckpointer(tmp_path, writable=False).restore_latest(_abstract()).step == 3


def test_restore_refuses_when_nothing_restores_and_reports_every_step(tmp_path):
    _save(tmp_path, [1, 2], width=3)
    reader = RunCheckpointer(tmp_path, writable=False)
    with pytest.raises(NoRestorableCheckpoint) as err:
        reader.restore_latest(_abstract(width=4))
    assert [s for s, _ in err.value.failures] == [2, 1]
    assert "step 2: it holds another model: params/w: saved (2, 3)" in str(err.value)
    with pytest.raises(NoRestorableCheckpoint, match="step 2: wrong config; step 1: wrong config"):
        reader.restore_latest(_abstract(), lambda config, weights_only: "wrong config")
    reader.close()


def test_read_only_checkpointer_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory"):
        RunCheckpointer(tmp_path, writable=False)
    assert list(tmp_path.iterdir()) == []


# ---- signals --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_aborts_setup_but_only_flags_a_running_loop(signum):
    previous = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as err:
        with StopSignals():
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs here
    assert err.value.step is None and err.value.exit_code == 128 + signum
    with StopSignals() as stop:
        stop.graceful()
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)  # a second signal while stopping is ignored
        time.sleep(0.1)
        assert stop.requested() == signum
    assert signal.getsignal(signum) is previous  # handlers restored


# ---- the run's data record ------------------------------------------------------------------------------------
def test_corpus_change_describes_what_changed():
    record = {"corpus": "files:a/*.txt", "corpus_hash": "0" * 64}
    assert rundir.corpus_change(record, "files:a/*.txt", "0" * 64) is None
    assert rundir.corpus_change(None, "x", "1") is None  # runs made before the record existed
    assert "changed on disk" in rundir.corpus_change(record, "files:a/*.txt", "1" * 64)
    assert "not 'lit'" in rundir.corpus_change(record, "lit", "0" * 64)


def test_run_config_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"train": {"steps": 3,}}')
    with pytest.raises(rundir.RunDirError, match=r"config.json: invalid JSON: .* at line 1 column 23"):
        read_run_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(rundir.RunDirError, match=r"config.json: must hold a JSON object .*got list"):
        read_run_config(tmp_path)
    (tmp_path / "config.json").write_text('{"train": {"steps": "many"}}')
    with pytest.raises(rundir.RunDirError, match=r"train.steps: must be an integer.*config.json"):
        read_run_config(tmp_path)
