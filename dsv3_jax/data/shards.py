"""Token windows on disk: a split's documents -> one token stream -> fixed-length windows in ArrayRecord shards.

The stream is `doc0 <eos> doc1 <eos> ... docN <eos>` (every document is followed by the separator). It is cut
into non-overlapping windows of `window` tokens from its start; the remainder shorter than a window is
dropped. Each window is one record (`group_size:1`: fastest random reads), stored as raw little-endian
uint16 when every id fits, else int32, and read back with `np.frombuffer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from dsv3_jax.data.tokenizer import Tokenizer

MAX_SHARD_BYTES = 256 * 2 ** 20
_ENCODE_BATCH_CHARS = 4 * 2 ** 20  # text encoded per call: parallel enough, memory stays bounded


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest stored dtype that holds every id below `vocab_size`."""
    return np.dtype("<u2") if vocab_size <= 2 ** 16 else np.dtype("<i4")


def decode_records(records: Sequence[bytes], dtype: str | np.dtype, window: int) -> np.ndarray:
    """Stored window records -> int32 array [len(records), window]."""
    flat = np.frombuffer(b"".join(records), dtype=np.dtype(dtype))
    if flat.size != len(records) * window:
        raise ValueError(f"records hold {flat.size} tokens, expected {len(records)} x {window}: corrupt cache?")
    return flat.reshape(len(records), window).astype(np.int32)


class WindowWriter:
    """Appends token ids to a stream and writes every full window as one record, rotating shards by size."""

    def __init__(self, directory: str | os.PathLike, prefix: str, window: int, dtype: np.dtype,
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory, self.prefix, self.window, self.dtype = Path(directory), prefix, window, np.dtype(dtype)
        self.windows_per_shard = max(1, max_shard_bytes // (window * self.dtype.itemsize))
        self.shards: list[str] = []
        self.n_tokens = 0
        self.n_windows = 0
        self.max_id = -1
        self._pending = np.zeros(0, np.int64)
        self._writer: ArrayRecordWriter | None = None

    def _write(self, window_ids: np.ndarray) -> None:
        if self._writer is None or self.n_windows % self.windows_per_shard == 0:
            self._close_shard()
            name = f"{self.prefix}-{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.shards.append(name)
        self._writer.write(window_ids.astype(self.dtype).tobytes())
        self.n_windows += 1

    def add(self, ids: np.ndarray) -> None:
        """Append ids to the stream; write the windows that became full."""
        ids = np.asarray(ids, np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"token id out of range for {self.dtype} storage: min {ids.min()}, max {ids.max()}")
        self.max_id = max(self.max_id, int(ids.max()))
        self.n_tokens += ids.size
        stream = np.concatenate([self._pending, ids])
        full = stream.size // self.window
        for i in range(full):
            self._write(stream[i * self.window:(i + 1) * self.window])
        self._pending = stream[full * self.window:]

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> dict:
        """Finish the last shard; returns the split's statistics (tokens, windows, dropped tail, shards)."""
        self._close_shard()
        return {"shards": list(self.shards), "n_tokens": self.n_tokens, "n_windows": self.n_windows,
                "n_dropped_tokens": int(self._pending.size), "max_token_id": self.max_id}


def write_split(texts: Sequence[str], tokenizer: Tokenizer, directory: str | os.PathLike, prefix: str,
                window: int, dtype: np.dtype) -> dict:
    """Encode `texts` in order, each followed by the separator, into window records under `directory`."""
    writer = WindowWriter(directory, prefix, window, dtype)
    eos = np.array([tokenizer.eos_id], np.int64)
    start = 0
    try:
        while start < len(texts):
            stop, chars = start, 0
            while stop < len(texts) and (stop == start or chars + len(texts[stop]) <= _ENCODE_BATCH_CHARS):
                chars += len(texts[stop])
                stop += 1
            for ids in tokenizer.encode_batch(texts[start:stop]):
                writer.add(np.concatenate([np.asarray(ids, np.int64), eos]))
            start = stop
    finally:
        stats = writer.close()
    stats.update(n_docs=len(texts), n_chars=sum(len(t) for t in texts),
                 n_bytes=sum(len(t.encode("utf-8")) for t in texts))
    return stats
