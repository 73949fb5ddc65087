"""Token windows cached in ArrayRecord shards, and the grain iterators the trainer reads them with.

`build_dataset` encodes each split once into `cache_dir/tokens/<corpus>-w<window>-<key>/` (key: corpus hash +
tokenizer hash + window; how: `build.py`) and returns a `TokenDataset`; later calls only read `meta.json`.

Training order: every epoch is a fresh seeded permutation of all train windows (grain's per-epoch reshuffle),
cut into global batches of `batch_size` (the windows left over in an epoch are skipped that epoch), repeated
forever. Process p of P gets rows [p*B/P, (p+1)*B/P) of every global batch, so the P processes' batches
stacked in process order are exactly the single-process batch. The iterator state is the number of global
batches served, so a run resumes exactly, even on a different number of processes.

Validation order: the validation windows in stream order, once, in full global batches; the last
`n_val_windows % batch_size` windows are not served (static batch shapes: no recompilation for a ragged tail).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dsv3_jax.data.corpus import Corpus
from dsv3_jax.data.fetch import resolve_cache_dir
from dsv3_jax.data.build import Progress, build_windows, finished
from dsv3_jax.data.documents import DataError
from dsv3_jax.data.shards import decode_records, token_dtype
from dsv3_jax.data.tokenizer import Tokenizer

_FORMAT = "dsv3-windows-v2"  # bump when the stream or record layout changes: it is part of the cache key
DEFAULT_PREFETCH = 16


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split on disk: its shard paths and sizes."""

    paths: tuple[Path, ...]
    n_docs: int
    n_chars: int
    n_bytes: int
    n_tokens: int  # stream length, separators included
    n_windows: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenDataset:
    """A corpus tokenized into fixed windows of `seq_len + 1 + mtp_depth` tokens, train and validation."""

    directory: Path
    corpus_name: str
    corpus_hash: str
    tokenizer: Tokenizer
    vocab_size: int  # every stored id is < vocab_size
    seq_len: int
    mtp_depth: int
    window: int
    dtype: str
    train: SplitInfo
    val: SplitInfo

    @property
    def key(self) -> str:
        """Identifies the stored windows (saved in iterator states to catch resuming on other data)."""
        return self.directory.name

    def check_batch_size(self, batch_size: int, process_count: int | None = None) -> int:
        """Raise DataError unless both splits hold one global batch and it divides among processes; local size."""
        _, process_count = resolve_process(0, process_count)
        local = local_batch_size(batch_size, process_count)
        _need_windows(self.train, "train", batch_size, self.window)
        _need_windows(self.val, "validation", batch_size, self.window)
        return local

    def steps_per_epoch(self, batch_size: int) -> int:
        """Global batches in one pass over the train windows."""
        return self.train.n_windows // batch_size

    def val_steps(self, batch_size: int) -> int:
        """Global batches `val_batches` yields (the last partial batch is dropped)."""
        return self.val.n_windows // batch_size

    def train_iterator(self, batch_size: int, seed: int = 0, process_index: int | None = None,
                       process_count: int | None = None, *, num_threads: int = 2,
                       prefetch: int = DEFAULT_PREFETCH) -> "TrainIterator":
        """Endless shuffled train batches for this process; see `TrainIterator`."""
        return TrainIterator(self, batch_size, seed, process_index, process_count, num_threads, prefetch)

    def val_batches(self, batch_size: int, process_index: int | None = None,
                    process_count: int | None = None) -> Iterator[np.ndarray]:
        """One ordered pass over the validation windows: [batch_size // process_count, window] int32 arrays."""
        return val_batches(self, batch_size, process_index, process_count)

    def summary(self) -> str:
        """One line of sizes for logs."""
        return (f"{self.corpus_name}: train {self.train.n_tokens:,} tokens / {self.train.n_windows:,} windows, "
                f"val {self.val.n_tokens:,} tokens / {self.val.n_windows:,} windows of {self.window} "
                f"(vocab {self.tokenizer.vocab_size}, {self.train.bytes_per_token:.2f} bytes/token)")


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), None taken from jax; raises DataError for an index out of range."""
    if process_index is None or process_count is None:
        import jax  # only when asked for the defaults: data tools need no accelerator runtime

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, process_count); got {process_index} of {process_count}")
    return process_index, process_count


def local_batch_size(batch_size: int, process_count: int) -> int:
    """Rows of each global batch one process gets; raises DataError unless batch_size divides evenly."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size % process_count:
        raise DataError(f"batch_size {batch_size} is not divisible by the process count {process_count}: every "
                        "process must get the same number of rows of each global batch")
    return batch_size // process_count


def _need_windows(split: SplitInfo, name: str, batch_size: int, window: int) -> None:
    if split.n_windows < batch_size:
        raise DataError(f"the {name} split has {split.n_tokens:,} tokens = {split.n_windows} windows of {window}, "
                        f"fewer than one batch of {batch_size} windows ({batch_size * window:,} tokens); use a "
                        "larger corpus, a smaller batch_size or a shorter seq_len")


def _grain_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e, so nearby user seeds would replay each other's epochs; hashing
    # the user seed spreads them over the 32-bit range.
    return int.from_bytes(hashlib.sha256(f"dsv3_jax.data.shuffle:{int(seed)}".encode()).digest()[:4], "big")


class TrainIterator:
    """Batches [batch_size // process_count, window] int32, forever; get_state/set_state resume exactly."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = 2, prefetch: int = DEFAULT_PREFETCH):
        process_index, process_count = resolve_process(process_index, process_count)
        local = local_batch_size(batch_size, process_count)
        _need_windows(dataset.train, "train", batch_size, dataset.window)
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.process_index, self.process_count, self.local_batch_size = process_index, process_count, local
        self.steps_per_epoch = dataset.steps_per_epoch(batch_size)
        dtype, window = dataset.dtype, dataset.window
        import grain  # here, not at import: grain loads JAX, which preparing data never needs

        source = grain.sources.ArrayRecordDataSource([str(p) for p in dataset.train.paths])
        ds = grain.MapDataset.source(source).shuffle(seed=_grain_seed(seed))
        ds = ds[:self.steps_per_epoch * batch_size]  # whole global batches only
        ds = ds.batch(local, drop_remainder=True, batch_fn=lambda recs: decode_records(recs, dtype, window))
        ds = ds[process_index::process_count].repeat()  # this process's row block of every global batch
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it = iter(ds.to_iter_dataset(options))

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """A small JSON-able dict: global batches served so far, plus what they were drawn from."""
        return {"grain": self._it.get_state(), "data": self.dataset.key, "batch_size": self.batch_size,
                "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state()` result of an iterator over the same data, batch size and seed."""
        if not isinstance(state, dict) or "grain" not in state:
            raise DataError(f"not a dsv3_jax data-iterator state: {state!r:.200}")
        mine = {"data": self.dataset.key, "batch_size": self.batch_size, "seed": self.seed}
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise DataError("cannot resume the data iterator: " + "; ".join(diffs))
        self._it.set_state(state["grain"])

    @property
    def step(self) -> int:
        """Global batches served so far (the next batch's index)."""
        return int(self._it.get_state()["next_index"])

    def close(self) -> None:
        """Stop grain's prefetch threads."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_iterator(ds: TokenDataset, batch_size: int, seed: int = 0, process_index: int | None = None,
                   process_count: int | None = None, **kwargs: Any) -> TrainIterator:
    """Endless shuffled train batches; process defaults come from jax.process_index()/process_count()."""
    return ds.train_iterator(batch_size, seed, process_index, process_count, **kwargs)


def val_batches(ds: TokenDataset, batch_size: int, process_index: int | None = None,
                process_count: int | None = None) -> Iterator[np.ndarray]:
    """The validation windows once, in order, as this process's rows of each full global batch."""
    process_index, process_count = resolve_process(process_index, process_count)
    local = local_batch_size(batch_size, process_count)
    _need_windows(ds.val, "validation", batch_size, ds.window)
    steps, paths, dtype, window = ds.val_steps(batch_size), [str(p) for p in ds.val.paths], ds.dtype, ds.window

    def batches() -> Iterator[np.ndarray]:
        import grain

        # A generator: the readers close when it is exhausted, closed or garbage-collected.
        with grain.sources.ArrayRecordDataSource(paths) as source:
            for step in range(steps):
                start = step * batch_size + process_index * local
                yield decode_records([source[i] for i in range(start, start + local)], dtype, window)

    return batches()


def windows_dir(name: str, identity: str, tokenizer: Tokenizer, window: int,
                cache_dir: str | os.PathLike | None) -> Path:
    """Where the windows of (a corpus's or token shards' `identity`, tokenizer, window) are stored."""
    key = hashlib.sha256(f"{_FORMAT}:{identity}:{tokenizer.hash}:{window}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:40] or "corpus"
    return resolve_cache_dir(cache_dir) / "tokens" / f"{slug}-w{window}-{key}"


def cache_dir_for(corpus: Corpus, tokenizer: Tokenizer, window: int, cache_dir: str | os.PathLike | None) -> Path:
    """Where the windows of (corpus, tokenizer, window) are built: stored, for a corpus in memory; for a streamed
    one, the name of its build, which points to the windows stored under the content identity
    (`build.finished`)."""
    return windows_dir(corpus.name, corpus.hash, tokenizer, window, cache_dir)


def base_meta(name: str, identity: str, tokenizer: Tokenizer) -> dict:
    """The meta.json fields every window directory starts with."""
    return {"format": _FORMAT, "corpus": name, "corpus_hash": identity, "tokenizer_hash": tokenizer.hash,
            "tokenizer_vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}


def dataset_from_meta(directory: Path, meta: dict, tokenizer: Tokenizer, vocab_size: int, seq_len: int,
                      mtp_depth: int) -> TokenDataset:
    """The TokenDataset of a finished window directory; DataError if it holds ids the model cannot embed."""
    for name, split in meta["splits"].items():
        if split["max_token_id"] >= vocab_size:
            raise DataError(f"{directory}: the {name} split holds token id {split['max_token_id']} >= vocab_size "
                            f"{vocab_size}")
    return TokenDataset(directory=directory, corpus_name=meta["corpus"], corpus_hash=meta["corpus_hash"],
                        tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq_len, mtp_depth=mtp_depth,
                        window=meta["window"], dtype=meta["dtype"],
                        train=_split_info(directory, meta["splits"]["train"]),
                        val=_split_info(directory, meta["splits"]["val"]))


def _split_info(directory: Path, meta: dict) -> SplitInfo:
    return SplitInfo(paths=tuple(directory / s for s in meta["shards"]), n_docs=meta["n_docs"],
                     n_chars=meta["n_chars"], n_bytes=meta["n_bytes"], n_tokens=meta["n_tokens"],
                     n_windows=meta["n_windows"])


def build_dataset(corpus: Corpus, tokenizer: Tokenizer, seq_len: int, mtp_depth: int = 0,
                  cache_dir: str | os.PathLike | None = None, *, vocab_size: int | None = None, workers: int = 0,
                  progress: Callable[[Progress], None] | None = None,
                  log: Callable[[str], None] | None = None) -> TokenDataset:
    """Token windows of `seq_len + 1 + mtp_depth` for both splits, encoded once (by `workers` processes, 0 = one
    per core; an interrupted encoding resumes) and then read from the cache (`build.build_windows`).

    `vocab_size` is the model's; a tokenizer with more ids than that is refused before anything is encoded.
    """
    if seq_len < 1 or mtp_depth < 0:
        raise DataError(f"need seq_len >= 1 and mtp_depth >= 0, got seq_len={seq_len}, mtp_depth={mtp_depth}")
    vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} ids but vocab_size is {vocab_size}: token ids "
                        f">= {vocab_size} would index past the embedding; use a tokenizer trained for that size")
    window = seq_len + 1 + mtp_depth
    done = finished(cache_dir_for(corpus, tokenizer, window, cache_dir))
    if done is None:
        final = (lambda identity: windows_dir(corpus.name, identity, tokenizer, window, cache_dir)) \
            if corpus.streamed else None
        done = build_windows(corpus, tokenizer, window, token_dtype(tokenizer.vocab_size),
                             cache_dir_for(corpus, tokenizer, window, cache_dir),
                             base_meta(corpus.name, corpus.hash, tokenizer), final_directory=final, workers=workers,
                             progress=progress, log=log)
    return dataset_from_meta(*done, tokenizer, vocab_size, seq_len, mtp_depth)
