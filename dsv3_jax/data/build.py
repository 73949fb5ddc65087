"""Encoding a corpus into window shards: streamed, in parallel worker processes, resumable, in bounded memory.

Reading: the main process streams the documents in corpus order, hashes their texts (the content hash stored
in meta.json) and groups them into work units of about `unit_chars` characters. Encoding: each of
`workers` processes takes a unit, splits its documents into train and validation pieces
(`corpus.split_document`) and encodes them with the tokenizer on one core, returning token arrays. The main
process appends the arrays to the two window streams in unit order, so the shards are byte-identical for any
number of workers. At most two units per worker are in flight, so memory does not grow with the corpus.

Resuming: whenever the train shard being written passes `shard_bytes` (checked at unit boundaries), both
splits' open shards are closed and `progress.json` records the units done, the tokens of the unfinished
window of each split and the counts so far. Run again, the build reads (without encoding) the units already
done, deletes shards written after the last checkpoint and carries on: the result is byte-identical to an
uninterrupted build. Everything is written in `.<name>.partial/` beside the final directory, which is renamed
into place with meta.json when complete, so a half-written build is never taken for a finished one. A lock
file keeps two builders of the same directory (two runs started together) from interleaving.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from dsv3_jax.data.corpus import (ContentHasher, Corpus, IdentityHasher, SplitTally, fallback_overrides,
                                  split_document)
from dsv3_jax.data.documents import CorpusError, DataError, Document
from dsv3_jax.data.shards import WindowWriter
from dsv3_jax.data.tokenizer import Tokenizer, load_tokenizer

UNIT_CHARS = 4 * 2 ** 20  # text per work unit: a second or two of one core's encoding
SHARD_BYTES = 64 * 2 ** 20  # train window bytes after which a checkpoint closes the shards
_PROGRESS = "progress.json"
_SPLITS = ("train", "val")


def default_workers() -> int:
    """All the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Progress:
    """Cumulative counts after each unit (what the progress bar shows)."""

    documents: int
    bytes: int
    tokens: int
    seconds: float


@dataclasses.dataclass
class _UnitResult:
    ids: dict[str, np.ndarray]  # split -> the split's pieces encoded, each followed by the separator
    counts: dict[str, dict[str, int]]  # split -> n_docs (pieces), n_chars, n_bytes
    tally: SplitTally


# ---- the worker side ---------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str) -> None:
    # One core per worker: the tokenizer's own thread pool would oversubscribe the cores the workers share.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path)


def _encode_in_worker(docs: Sequence[Document], first_index: int, val_fraction: float, chunk_chars: int,
                      forced: Mapping[tuple[int, int], bool], dtype: str) -> _UnitResult:
    return encode_unit(_WORKER["tokenizer"], docs, first_index, val_fraction, chunk_chars, forced, dtype)


def encode_unit(tokenizer: Tokenizer, docs: Sequence[Document], first_index: int, val_fraction: float,
                chunk_chars: int, forced: Mapping[tuple[int, int], bool], dtype: str) -> _UnitResult:
    """Split the unit's documents (`first_index` is the first one's index in the corpus) and encode each piece
    followed by the separator, per split."""
    tally = SplitTally()
    texts: dict[str, list[str]] = {name: [] for name in _SPLITS}
    for offset, doc in enumerate(docs):
        for is_val, text in split_document(doc, first_index + offset, val_fraction, chunk_chars, forced, tally):
            texts["val" if is_val else "train"].append(text)
    ids, counts = {}, {}
    for name, pieces in texts.items():
        encoded = tokenizer.encode_batch(pieces) if pieces else []
        lengths = np.array([len(e) + 1 for e in encoded], np.int64)
        flat = np.full(int(lengths.sum()), tokenizer.eos_id, np.int64)
        ends = np.cumsum(lengths)
        for end, length, e in zip(ends, lengths, encoded):
            flat[end - length:end - 1] = e
        if flat.size and (flat.max() > np.iinfo(dtype).max):
            raise ValueError(f"token id {flat.max()} does not fit the {dtype} storage")
        ids[name] = flat.astype(dtype)
        counts[name] = {"n_docs": len(pieces), "n_chars": sum(map(len, pieces)),
                        "n_bytes": sum(len(t.encode("utf-8")) for t in pieces)}
    return _UnitResult(ids, counts, tally)


# ---- the main process --------------------------------------------------------------------------------------

def _units(docs: Iterator[Document], unit_chars: int) -> Iterator[list[Document]]:
    unit, chars = [], 0
    for doc in docs:
        unit.append(doc)
        chars += len(doc.text)
        if chars >= unit_chars:
            yield unit
            unit, chars = [], 0
    if unit:
        yield unit


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Held while `directory` is built: a second builder (another run, another process) waits, then finds it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the finished directory
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class _Build:
    """One build's state in the partial directory: writers, counts, tally; saved at every checkpoint."""

    def __init__(self, partial: Path, identity: dict, window: int, dtype: np.dtype, shard_bytes: int,
                 forced: dict[tuple[int, int], bool]):
        self.partial, self.identity, self.window, self.dtype = partial, identity, window, dtype
        self.windows_per_shard = max(1, shard_bytes // (window * dtype.itemsize))
        self.forced = forced
        self.writers = {name: WindowWriter(partial, name, window, dtype) for name in _SPLITS}
        self.counts = {name: {"n_docs": 0, "n_chars": 0, "n_bytes": 0} for name in _SPLITS}
        self.tally = SplitTally()
        self.units_done = 0
        self.documents = 0

    def state(self) -> dict:
        return {"identity": self.identity, "forced": [[*k, v] for k, v in sorted(self.forced.items())],
                "units_done": self.units_done, "documents": self.documents, "tally": self.tally.to_dict(),
                "counts": self.counts, "writers": {n: w.state() for n, w in self.writers.items()}}

    def restore(self, state: dict) -> None:
        self.units_done, self.documents = state["units_done"], state["documents"]
        self.tally = SplitTally.from_dict(state["tally"])
        self.counts = state["counts"]
        for name, writer in self.writers.items():
            writer.restore(state["writers"][name])
        kept = {s for w in self.writers.values() for s in w.shards} | {_PROGRESS}
        for path in self.partial.iterdir():  # shards begun after the last checkpoint are written again
            if path.name not in kept:
                path.unlink()

    def add(self, result: _UnitResult, n_documents: int) -> None:
        for name in _SPLITS:
            self.writers[name].add(result.ids[name])
            for k, v in result.counts[name].items():
                self.counts[name][k] += v
        self.tally.add(result.tally)
        self.units_done += 1
        self.documents += n_documents
        if any(w.shard_windows >= self.windows_per_shard for w in self.writers.values()):
            self.checkpoint()

    def checkpoint(self) -> None:
        for writer in self.writers.values():
            writer.close_shard()
        _write_json(self.partial / _PROGRESS, self.state())

    @property
    def tokens(self) -> int:
        return sum(w.n_tokens for w in self.writers.values())

    @property
    def bytes(self) -> int:
        return sum(c["n_bytes"] for c in self.counts.values())


def _load_progress(partial: Path, identity: dict) -> dict | None:
    """The saved state of an interrupted build of the same data, else None (and the partial dir is cleared)."""
    path = partial / _PROGRESS
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = None
        if isinstance(state, dict) and state.get("identity") == identity:
            return state
    shutil.rmtree(partial, ignore_errors=True)
    return None


def finished(directory: Path) -> tuple[Path, dict] | None:
    """(the windows' directory, its meta.json) if the build keyed by `directory` is complete, else None; a
    streamed corpus's build is found through the pointer its manifest-keyed name leaves (`build_windows`)."""
    if (directory / "meta.json").is_file():
        return directory, json.loads((directory / "meta.json").read_text())
    pointer = _pointer(directory)
    if pointer.is_file():
        target = directory.parent / json.loads(pointer.read_text())["directory"]
        if (target / "meta.json").is_file():
            return target, json.loads((target / "meta.json").read_text())
    return None


def _pointer(directory: Path) -> Path:
    return directory.parent / f"{directory.name}.json"


def build_windows(corpus: Corpus, tokenizer: Tokenizer, window: int, dtype: np.dtype, directory: Path, meta: dict,
                  *, final_directory: Callable[[str], Path] | None = None, workers: int = 0,
                  unit_chars: int = UNIT_CHARS, shard_bytes: int = SHARD_BYTES,
                  progress: Callable[[Progress], None] | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Encode both splits of `corpus` (module docstring); returns the windows' directory and its meta.json
    (`meta` plus the build's statistics and the corpus's content identity as `corpus_hash`). Returns at once
    if the build is complete. `workers` 0 means one per core.

    `directory` names the build (its partial directory, lock and resume state). With `final_directory`, the
    windows go to `final_directory(identity)` once the content identity is known, and `directory` becomes a
    small pointer file to it: a streamed corpus is known by its file manifest up front, but touched or copied
    files with the same documents end in the same windows (and a run on them resumes)."""
    cores = default_workers()
    if workers > cores:  # more encoder processes than cores only costs memory (each holds a tokenizer)
        print(f"data: data.workers={workers} is more than this machine's {cores} cores; using {cores}",
              file=sys.stderr)
    workers = min(workers, cores) if workers else cores
    identity = dict(meta, window=window, dtype=np.dtype(dtype).str, tokenizer=tokenizer.hash,
                    corpus=corpus.hash, unit_chars=unit_chars, shard_bytes=shard_bytes)
    with build_lock(directory):
        done = finished(directory)
        if done is not None:
            return done
        partial = directory.parent / f".{directory.name}.partial"
        forced: dict[tuple[int, int], bool] = {}
        t0 = time.perf_counter()
        while True:
            state = _load_progress(partial, identity)
            if state is not None and not forced:  # an interrupted second pass resumes with its overrides
                forced = {(a, b): v for a, b, v in state["forced"]}
            partial.mkdir(parents=True, exist_ok=True)
            build = _Build(partial, identity, window, np.dtype(dtype), shard_bytes, forced)
            if state is not None:
                build.restore(state)
                if log:
                    log(f"resuming an interrupted preparation after {build.units_done} units "
                        f"({build.documents:,} documents, {build.tokens:,} tokens)")
            content, corpus_hash = _encode_all(corpus, tokenizer, build, workers, unit_chars, progress, t0)
            build.checkpoint()
            overrides = fallback_overrides(build.tally)
            if not overrides:
                break
            forced = overrides  # only a corpus of a few dozen chunks gets here: encode it again, exactly split
            shutil.rmtree(partial)
        stats = {name: dict(build.writers[name].stats(), **build.counts[name]) for name in _SPLITS}
        for name, split in stats.items():
            if split["n_windows"] == 0:  # nothing worth resuming: another window length is another directory
                shutil.rmtree(partial, ignore_errors=True)
                raise DataError(f"the {'validation' if name == 'val' else name} split of {corpus.name!r} has "
                                f"{split['n_tokens']:,} tokens, fewer than one window of {window} (seq_len + 1 + "
                                "mtp_depth); use a larger corpus or a shorter seq_len")
        meta = dict(meta, corpus_hash=corpus_hash, window=window, dtype=np.dtype(dtype).str, splits=stats,
                    corpus_content_hash=content, n_documents=build.documents, units=build.units_done,
                    workers=workers, build_seconds=round(time.perf_counter() - t0, 2))
        if corpus.streamed:
            meta["corpus_manifest"] = corpus.manifest
        (partial / _PROGRESS).unlink()
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        target = directory if final_directory is None else final_directory(corpus_hash)
        try:
            partial.rename(target)  # complete: from now on every run reads it
        except OSError:
            if not (target / "meta.json").is_file():
                raise
            # The same documents were encoded before (files touched or copied since): those windows stand.
            shutil.rmtree(partial)
            meta = json.loads((target / "meta.json").read_text())
            if log:
                log(f"the files hold the same documents as an earlier preparation: using {target.name}")
        if target != directory:
            _write_json(_pointer(directory), {"directory": target.name, "corpus_hash": corpus_hash})
        return target, meta


def _encode_all(corpus: Corpus, tokenizer: Tokenizer, build: _Build, workers: int, unit_chars: int,
                progress: Callable[[Progress], None] | None, t0: float) -> tuple[str, str]:
    """Stream the corpus through the encoders into `build`; returns the (content hash, identity) of every
    document read."""
    hasher, identity = ContentHasher(), IdentityHasher(corpus.val_fraction, corpus.chunk_chars)
    units = _units(iter(_hashed(corpus.iter_documents(), hasher, identity)), unit_chars)
    first_index = 0
    for _ in range(build.units_done):  # done before an interruption: read and hashed, not encoded again
        unit = next(units, None)
        if unit is None:
            raise CorpusError(f"{corpus.name}: the corpus has fewer units than its interrupted preparation "
                              "recorded; was it changed while being prepared?")
        first_index += len(unit)
    args = (corpus.val_fraction, corpus.chunk_chars, build.forced, build.dtype.str)

    def report() -> None:
        if progress is not None:
            progress(Progress(build.documents, build.bytes, build.tokens, time.perf_counter() - t0))

    first = next(units, None)
    second = next(units, None) if first is not None else None
    if second is None:  # one unit (a small corpus): encode here, no worker processes to start
        if first is not None:
            build.add(encode_unit(tokenizer, first, first_index, *args), len(first))
            report()
        return hasher.hexdigest(), identity.hexdigest()
    pending: collections.deque = collections.deque()
    with _worker_pool(workers, tokenizer) as pool:
        for unit in itertools.chain([first, second], units):
            pending.append((pool.submit(_encode_in_worker, unit, first_index, *args), len(unit)))
            first_index += len(unit)
            while len(pending) >= 2 * workers:
                future, n = pending.popleft()
                build.add(future.result(), n)
                report()
        while pending:
            future, n = pending.popleft()
            build.add(future.result(), n)
            report()
    return hasher.hexdigest(), identity.hexdigest()


@contextlib.contextmanager
def _worker_pool(workers: int, tokenizer: Tokenizer) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """`workers` spawned processes, each holding the tokenizer (never forked: the parent may run JAX threads).

    A spawned process re-imports the parent's `__main__` module; a user's script that prepares data without an
    `if __name__ == "__main__":` guard would run again in every worker (and wait forever on the build lock). The
    workers need nothing from it, so it is hidden from them while they start."""
    context = multiprocessing.get_context("spawn")
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(str(tokenizer.path),))
    try:
        try:
            if main is not None:
                main.__spec__ = None
                if hasattr(main, "__file__"):
                    del main.__file__
            for _ in range(workers):  # each submission to a pool without idle workers starts one, now
                pool.submit(int)
        finally:
            for k, v in saved.items():
                setattr(main, k, v)
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _hashed(docs: Iterator[Document], content: ContentHasher, identity: IdentityHasher) -> Iterator[Document]:
    for doc in docs:
        content.update(doc.text)
        identity.update(doc)
        yield doc
