"""`tokens:DIR`: training on token shards produced elsewhere, re-cut into this project's windows.

DIR holds token streams, read in sorted path order (subdirectories included):
- `.npy`: a 1-D array of uint16, uint32 or int32 (its dtype is in the file);
- `.bin`: raw little-endian tokens of `data.token_dtype` (uint16 by default, as nanoGPT writes them);
- `.array_record`: records of raw little-endian `data.token_dtype` tokens, each appended in order.
The streams are taken as they are: documents must already be separated by the tokenizer's end-of-text token.
Shards whose file name starts with `val` (or that sit in a `val` directory) form the validation split; if
there are none, window i of the one stream goes to validation when a hash of `window#i` falls below
`val_fraction` (deterministic, and adding shards at the end moves no earlier window).

Everything is validated while it is re-cut, before training: the dtype, that no shard is empty, and that every
id is below the model's vocab_size (the first offending shard is named). Identity: the shards' manifest
(relative paths, sizes, modification times) and `token_dtype`, so the same files are re-cut only once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from dsv3_jax.data.build import build_lock
from dsv3_jax.data.corpus import _unit_score
from dsv3_jax.data.documents import CorpusError, DataError
from dsv3_jax.data.shards import WindowWriter

TOKEN_SUFFIXES = (".npy", ".bin", ".array_record")
TOKEN_DTYPES = ("uint16", "uint32", "int32")
_READ_TOKENS = 16 * 2 ** 20  # tokens per read: memory stays bounded on shards of any size


def token_shards(directory: str | os.PathLike) -> list[tuple[Path, bool]]:
    """(shard path, is_validation) for every token file under `directory`, sorted; CorpusError if none."""
    root = Path(os.path.expanduser(directory))
    if not root.is_dir():
        raise CorpusError(f"tokens:{directory} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TOKEN_SUFFIXES))
    if not paths:
        raise CorpusError(f"tokens:{directory} holds no token shard ({', '.join(TOKEN_SUFFIXES)})")
    return [(p, p.name.startswith("val") or "val" in p.relative_to(root).parts[:-1]) for p in paths]


def tokens_manifest(directory: str | os.PathLike, token_dtype: str) -> str:
    """sha256 of the shards' relative paths, sizes and modification times, and `token_dtype`."""
    root = Path(os.path.expanduser(directory))
    h = hashlib.sha256(f"tokens-manifest-v1 token_dtype={token_dtype}".encode())
    for path, is_val in token_shards(directory):
        stat = path.stat()
        h.update(f"\n{path.relative_to(root).as_posix()}\t{is_val}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def _checked_dtype(dtype: np.dtype, where: str) -> np.dtype:
    if dtype.name not in TOKEN_DTYPES:
        raise CorpusError(f"{where}: tokens of dtype {dtype.name}; token shards hold {', '.join(TOKEN_DTYPES)}")
    return dtype.newbyteorder("<")


def read_token_shard(path: Path, token_dtype: str) -> Iterator[np.ndarray]:
    """The shard's tokens in pieces of at most `_READ_TOKENS`; CorpusError for an empty or malformed shard."""
    n = 0
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise CorpusError(f"{path}: not a readable .npy file ({err})") from None
        _checked_dtype(array.dtype, str(path))
        if array.ndim != 1:
            raise CorpusError(f"{path}: a token shard is 1-D, this array has shape {array.shape}")
        for start in range(0, array.size, _READ_TOKENS):
            yield np.asarray(array[start:start + _READ_TOKENS])
        n = array.size
    elif path.suffix == ".bin":
        dtype = _checked_dtype(np.dtype(token_dtype), f"data.token_dtype for {path}")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise CorpusError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (is "
                              "data.token_dtype right?)")
        if size:
            array = np.memmap(path, dtype=dtype, mode="r")
            for start in range(0, array.size, _READ_TOKENS):
                yield np.asarray(array[start:start + _READ_TOKENS])
            n = array.size
    else:
        from array_record.python.array_record_module import ArrayRecordReader

        dtype = _checked_dtype(np.dtype(token_dtype), f"data.token_dtype for {path}")
        try:
            reader = ArrayRecordReader(str(path))
        except Exception as err:  # noqa: BLE001 - the C++ reader raises a bare RuntimeError/Exception
            raise CorpusError(f"{path}: not a readable ArrayRecord file ({str(err).splitlines()[0][:200]})") from None
        try:
            for start in range(0, reader.num_records(), 1024):
                records = reader.read(list(range(start, min(start + 1024, reader.num_records()))))
                data = b"".join(records)
                if len(data) % dtype.itemsize:
                    raise CorpusError(f"{path}: records {start}-{start + len(records) - 1} are not whole "
                                      f"{dtype.name} tokens (is data.token_dtype right?)")
                n += len(data) // dtype.itemsize
                yield np.frombuffer(data, dtype)
        finally:
            reader.close()
    if n == 0:
        raise CorpusError(f"{path}: an empty token shard")


def build_token_windows(source: str, window: int, dtype: np.dtype, vocab_size: int, eos_id: int, directory: Path,
                        meta: dict, *, token_dtype: str = "uint16", val_fraction: float = 0.05) -> dict:
    """Re-cut the shards of `tokens:source` into window shards in `directory` (atomically, under the builders'
    lock); returns its meta.json. Returns the existing meta if `directory` is complete."""
    shard_list = token_shards(source)
    explicit_val = any(is_val for _, is_val in shard_list)
    with build_lock(directory):
        if (directory / "meta.json").is_file():
            return json.loads((directory / "meta.json").read_text())
        partial = directory.parent / f".{directory.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        writers = {name: WindowWriter(partial, name, window, dtype) for name in ("train", "val")}
        docs = {"train": 0, "val": 0}
        pending = np.zeros(0, np.int64)  # the hashed split: the unfinished window of the one stream
        next_window = 0
        try:
            for path, is_val in shard_list:
                for ids in read_token_shard(path, token_dtype):
                    top = int(ids.max())
                    if top >= vocab_size:
                        raise DataError(f"{path} holds token id {top} >= model.vocab_size {vocab_size}: wrong "
                                        "tokenizer, or set model.vocab_size")
                    if explicit_val:
                        split = "val" if is_val else "train"
                        writers[split].add(ids.astype(dtype))
                        docs[split] += int(np.count_nonzero(ids == eos_id))
                        continue
                    stream = np.concatenate([pending, ids.astype(np.int64)])
                    full = stream.size // window
                    windows = stream[:full * window].reshape(full, window)
                    is_val = np.array([_unit_score(f"window#{next_window + i}") < val_fraction
                                       for i in range(full)], bool)
                    starts = np.concatenate([[0], np.flatnonzero(np.diff(is_val)) + 1]) if full else []
                    for start, stop in zip(starts, [*starts[1:], full]):  # runs of windows on one side
                        split = "val" if is_val[start] else "train"
                        writers[split].add(windows[start:stop].ravel().astype(dtype))
                        docs[split] += int(np.count_nonzero(windows[start:stop] == eos_id))
                    next_window += full
                    pending = stream[full * window:]
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        stats = {}
        for name, writer in writers.items():
            writer.close_shard()
            stats[name] = dict(writer.stats(), n_docs=docs[name], n_chars=0, n_bytes=0)
        stats["train"]["n_dropped_tokens"] += int(pending.size)  # the hashed split's unfinished window
        for name, split in stats.items():
            if split["n_windows"] == 0:
                shutil.rmtree(partial, ignore_errors=True)
                raise DataError(f"tokens:{source}: the {'validation' if name == 'val' else name} split has "
                                f"{split['n_tokens']:,} tokens, fewer than one window of {window}; add "
                                f"{'val* shards' if name == 'val' else 'tokens'} or use a shorter seq_len")
        meta = dict(meta, window=window, dtype=np.dtype(dtype).str, splits=stats, n_shards_read=len(shard_list),
                    validation="val shards" if explicit_val else f"hashed windows at {val_fraction}")
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        partial.rename(directory)
        return meta
