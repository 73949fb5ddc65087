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
    """Appends token ids to a stream and writes every full window as one record. A shard stays open until
    `close_shard` (the build closes all shards at its checkpoints); `state`/`restore` carry a writer across
    an interruption, the unfinished window's tokens included."""

    def __init__(self, directory: str | os.PathLike, prefix: str, window: int, dtype: np.dtype):
        self.directory, self.prefix, self.window, self.dtype = Path(directory), prefix, window, np.dtype(dtype)
        self.shards: list[str] = []
        self.n_tokens = 0
        self.n_windows = 0
        self.shard_windows = 0  # windows in the open shard
        self.max_id = -1
        self._pending = np.zeros(0, self.dtype)
        self._writer: ArrayRecordWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        """Append ids to the stream; write the windows that became full."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        if ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"token id out of range for {self.dtype} storage: min {ids.min()}, max {ids.max()}")
        self.max_id = max(self.max_id, int(ids.max()))
        self.n_tokens += ids.size
        stream = np.concatenate([self._pending, ids.astype(self.dtype)])
        full = stream.size // self.window
        if full and self._writer is None:
            name = f"{self.prefix}-{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.shards.append(name)
        for i in range(full):
            self._writer.write(stream[i * self.window:(i + 1) * self.window].tobytes())
        self.n_windows += full
        self.shard_windows += full
        self._pending = stream[full * self.window:]

    def close_shard(self) -> None:
        """Finish the open shard (if any); the next window starts a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.shard_windows = 0

    def state(self) -> dict:
        """Everything needed to continue after `close_shard`, JSON-able."""
        if self._writer is not None:
            raise RuntimeError("close the open shard before saving the writer's state")
        return {"shards": list(self.shards), "n_tokens": self.n_tokens, "n_windows": self.n_windows,
                "max_token_id": self.max_id, "pending": self._pending.tolist()}

    def restore(self, state: dict) -> None:
        self.shards = list(state["shards"])
        self.n_tokens, self.n_windows, self.max_id = state["n_tokens"], state["n_windows"], state["max_token_id"]
        self._pending = np.asarray(state["pending"], self.dtype)

    def stats(self) -> dict:
        """The split's statistics (tokens, windows, dropped tail, shards); call after `close_shard`."""
        return {"shards": list(self.shards), "n_tokens": self.n_tokens, "n_windows": self.n_windows,
                "n_dropped_tokens": int(self._pending.size), "max_token_id": self.max_id}
