"""A run directory's own files beside its checkpoints: the exclusive lock, the tokenizer and the data record.

Layout of `RUN/`:
    config.json          the run's configuration (written by `train`)
    LOCK                 held by the one `train` process writing this run (see `RunLock`)
    tokenizer.json       the exact tokenizer the run trained with; `eval`/`generate` read this one
    tokenizer_config.json  its end-of-text token, when the run was given a tokenizer (`data.tokenizer`) whose
                         separator is not `<|endoftext|>`
    data.json            what the run trained on: corpus name and hashes, tokenizer hash, window, split sizes
    checkpoints/<step>/  orbax checkpoints (`dsv3_jax.checkpoint`)
    checkpoints_broken/  checkpoints that failed to restore, moved aside (never deleted) so the steps they
                         held can be recomputed and saved again
    metrics.jsonl        one JSON record per logged step; metrics.discarded.jsonl keeps records of steps
                         that were redone after a resume
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

LOCK_NAME = "LOCK"
TOKENIZER_NAME = "tokenizer.json"
DATA_RECORD_NAME = "data.json"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (missing, not a directory, locked, inconsistent)."""


class RunDirLocked(RunDirError):
    """Another process holds the run directory's lock."""


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers never see a partial file, and a
    crash leaves the old file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether RUN/checkpoints holds at least one step directory (restorable or not)."""
    path = Path(run_dir) / "checkpoints"
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def check_training_dir(run_dir: str | os.PathLike) -> None:
    """RunDirError unless `run_dir` may hold a training run: absent, empty (a lock left aside), or a run
    directory (a config.json) whose `checkpoints` is a directory if it exists. A folder of other files is never
    written into: the run would overwrite a tokenizer.json or append to a metrics.jsonl that are not its own."""
    text = os.fspath(run_dir)
    if not text.strip():
        raise RunDirError("--run-dir is empty: name a directory for the run")
    path = Path(text)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunDirError(f"--run-dir {text!r} exists and is not a directory")
    entries = sorted(set(os.listdir(path)) - {LOCK_NAME})
    if entries and not (path / "config.json").is_file():
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunDirError(f"--run-dir {text!r} exists and is not a dsv3_jax run directory (it holds {shown} and "
                          "no config.json); use a new or empty directory")
    checkpoints = path / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise RunDirError(f"{str(checkpoints)!r} is not a directory: the run's checkpoints cannot be read or "
                          "written; move it aside to start over, or restore the directory")
    trained = 0 if has_checkpoints(path) else _last_logged_step(path / "metrics.jsonl")  # read only then
    if trained:
        raise RunDirError(f"{text!r} holds a run that trained to step {trained} (metrics.jsonl) but no checkpoint "
                          "to resume from; starting it again from step 0 would train over its history. Restore "
                          "its checkpoints, or use a new --run-dir")


def _last_logged_step(metrics: Path) -> int:
    """The last training step a run's metrics.jsonl records (0 if none; unreadable lines are skipped)."""
    if not metrics.is_file():
        return 0
    last = 0
    with open(metrics, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") == "train" and isinstance(record.get("step"), int):
                last = max(last, record["step"])
    return last


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path if it is an existing directory holding a config.json, else RunDirError."""
    path = Path(run_dir)
    if not path.exists():
        raise RunDirError(f"run directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise RunDirError(f"run directory {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise RunDirError(f"{str(path)!r} has no config.json: is it a dsv3_jax run directory?")
    return path


def _holder_description(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {since})"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, held by `train` for the whole run.

    The lock is an `fcntl.flock` on `RUN/LOCK`, which the kernel releases when the holder exits however it
    exits, so a crashed run never leaves a stale lock on a local or NFSv4 file system; the file records the
    holder's pid, host and start time for the error message. Where the file system has no flock (some FUSE
    mounts), the file's existence is the lock: a holder on this host whose pid is gone is taken over, one on
    another host must be removed by hand (`train --break-lock`, or delete `RUN/LOCK`) once you are sure that run
    is dead. `train()` takes it once; a second holder, in this process or another, is refused.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(os.path.realpath(os.fspath(run_dir))) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock_fd(fd)
            mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _lock_fd(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(self._locked_message(_read_holder(self.path))) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self._check_pid_file()  # no flock here: the recorded holder decides

    def _check_pid_file(self) -> None:
        holder = _read_holder(self.path)
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int):
            return
        if host == socket.gethostname() and not _pid_alive(pid):
            print(f"note: taking over the stale lock of {_holder_description(holder)}, which is no longer "
                  "running", file=sys.stderr)
            return
        raise RunDirLocked(self._locked_message(holder))

    def _locked_message(self, holder: dict[str, Any]) -> str:
        run_dir = self.path.parent
        return (f"{run_dir} is in use by another training run: {_holder_description(holder)}. Wait for it to "
                f"finish, or use another --run-dir; if that process is dead (e.g. on another host), remove "
                f"{self.path} or pass --break-lock")

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # keep the file (unlinking it would let two processes lock two inodes)
        os.close(fd)  # releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def break_lock(run_dir: str | os.PathLike) -> str | None:
    """Remove a run's lock file; returns a description of the holder it named, or None if there was none.

    Refuses while a process on this machine still holds the flock (that run is alive: stop it instead).
    """
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    holder = _read_holder(path)
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirLocked(f"{path} is held by a live process ({_holder_description(holder)}); stop that run "
                               "instead of breaking its lock") from None
        except OSError:
            pass  # no flock on this file system: the file is the whole lock
        path.unlink()
    finally:
        os.close(fd)
    return _holder_description(holder) if holder else "an unknown holder"


# ---- the run's tokenizer and data record ---------------------------------------------------------------------
def run_tokenizer_path(run_dir: str | os.PathLike) -> Path | None:
    """RUN/tokenizer.json if the run carries its tokenizer (runs made before this existed do not)."""
    path = Path(run_dir) / TOKENIZER_NAME
    return path if path.is_file() else None


def legacy_tokenizer_note(run_dir: str | os.PathLike, corpus: str) -> str:
    """What eval/generate say about a run made before runs carried their tokenizer."""
    return (f"note: {run_dir} has no {TOKENIZER_NAME} (it predates runs carrying their tokenizer); rebuilding "
            f"the tokenizer from corpus {corpus!r}")


def read_data_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """RUN/data.json (what the run trained on), or None for runs made before it existed."""
    path = Path(run_dir) / DATA_RECORD_NAME
    if not path.is_file():
        return None
    from dsv3_jax.config_fields import ConfigError, read_json_object

    try:
        return read_json_object(str(path), "the run's data record")
    except ConfigError as err:
        raise RunDirError(str(err)) from None


def data_record(dataset: Any) -> dict[str, Any]:
    """The record of a prepared `data.TokenDataset`: enough to tell later whether the corpus changed."""
    split = lambda s: {"docs": s.n_docs, "bytes": s.n_bytes, "tokens": s.n_tokens, "windows": s.n_windows}  # noqa: E731
    return {"corpus": dataset.corpus_name, "corpus_hash": dataset.corpus_hash,
            "tokenizer_hash": dataset.tokenizer.hash, "tokenizer_vocab_size": dataset.tokenizer.vocab_size,
            "eos_id": dataset.tokenizer.eos_id, "window": dataset.window, "dataset_key": dataset.key,
            "train": split(dataset.train), "val": split(dataset.val)}


def save_run_data(run_dir: str | os.PathLike, dataset: Any) -> None:
    """Copy the dataset's tokenizer into the run and write RUN/data.json (atomically, writer only)."""
    run_dir = Path(run_dir)
    target, tokenizer = run_dir / TOKENIZER_NAME, Path(dataset.tokenizer.path).read_bytes()
    if not target.is_file() or target.read_bytes() != tokenizer:
        atomic_write(target, tokenizer)
    from dsv3_jax.data.tokenizer import EOS_TOKEN, TOKENIZER_CONFIG  # data code only where data is recorded

    eos = dataset.tokenizer.eos_token
    if eos != EOS_TOKEN:  # a given tokenizer: its copy must find the same end-of-text token on its own
        atomic_write(run_dir / TOKENIZER_CONFIG, json.dumps({"eos_token": eos}, ensure_ascii=False) + "\n")
    atomic_write(run_dir / DATA_RECORD_NAME, json.dumps(data_record(dataset), indent=2, sort_keys=True) + "\n")


def corpus_change(record: dict[str, Any] | None, corpus_name: str, corpus_hash: str) -> str | None:
    """A sentence saying how the corpus on disk differs from the one the run trained on, or None if it does not
    (or the run has no record to compare with)."""
    if record is None:
        return None
    if record.get("corpus") != corpus_name:
        return f"the run trained on corpus {record.get('corpus')!r}, not {corpus_name!r}"
    if record.get("corpus_hash") != corpus_hash:
        return (f"corpus {corpus_name!r} has changed on disk since the run trained on it (hash "
                f"{str(record.get('corpus_hash'))[:12]} then, {corpus_hash[:12]} now)")
    return None


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike, enabled: bool = True) -> Iterator[RunLock | None]:
    """`with locked(run_dir):` holds the run's lock (a no-op when not `enabled`, e.g. on non-writer hosts)."""
    if not enabled:
        yield None
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
