"""Documents from the user's files, one at a time: plain text, JSON lines (optionally gzip- or
zstd-compressed), Parquet (row group by row group) and directories written by HF `datasets`' `save_to_disk`
(Arrow stream files).

Every reader yields `Document(key, text)` with a key that names the document stably (file path relative to
the pattern's root, then line, row or row index), never its position in a listing, so adding a file moves no
other document across the train/validation split. Bad input is a `CorpusError` naming the file and, where
known, the line or row group: a corrupt archive, a missing or non-string text field, invalid JSON, non-UTF-8
bytes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import IO, Iterator

from dsv3_jax.data.documents import CorpusError, Document, decode_text

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
FILE_SUFFIXES = (".txt", *JSONL_SUFFIXES, ".parquet")
_PARQUET_BATCH_ROWS = 1024
HF_DATASET_MARKER = "state.json"  # what `datasets.Dataset.save_to_disk` writes beside its .arrow files


def is_hf_dataset_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_DATASET_MARKER))


def read_documents(path: str, key: str, text_field: str = "text") -> Iterator[Document]:
    """The documents of one file (or `save_to_disk` directory), in file order."""
    if is_hf_dataset_dir(path):
        yield from _arrow_dir_documents(path, key, text_field)
    elif path.endswith(".txt"):
        yield Document(key, decode_text(Path(path).read_bytes(), path))
    elif path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, key, text_field)
    elif path.endswith(".parquet"):
        yield from _parquet_documents(path, key, text_field)
    else:
        raise CorpusError(f"{path}: unsupported file type (read: {', '.join(FILE_SUFFIXES)} and HF save_to_disk "
                          "directories)")


def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _jsonl_documents(path: str, key: str, text_field: str) -> Iterator[Document]:
    lineno = 0
    try:
        with _open_binary(path) as raw:
            for lineno, line in enumerate(io.BufferedReader(raw), 1):  # type: ignore[arg-type]
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(decode_text(line, where))
                except json.JSONDecodeError as err:
                    raise CorpusError(f"{where} is not valid JSON ({err.msg})") from None
                yield Document(f"{key}:{lineno}", _text_of(record, text_field, where))
    except _archive_errors(path) as err:
        raise CorpusError(f"{path}: cannot be read past line {lineno} ({_first_line(err)})") from None


def _archive_errors(path: str) -> tuple[type[BaseException], ...]:
    """What a corrupt or truncated file raises while it is read: gzip's errors, and zstandard's own."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if path.endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise CorpusError(f"{where} has no string {text_field!r} field (set data.text_field to the field that holds "
                          "the text)")
    return record[text_field]


def _parquet_documents(path: str, key: str, text_field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
    if text_field not in parquet.schema_arrow.names:
        raise CorpusError(f"{path} has no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}; "
                          "set data.text_field)")
    row = 0
    for group in range(parquet.num_row_groups):
        try:  # a row group in batches of rows: memory is bounded by the batch, not by the row group's size
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[group],
                                              columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    if not isinstance(value, str):
                        raise CorpusError(f"{path}: row {row} (row group {group}) has no string {text_field!r}")
                    yield Document(f"{key}:{row}", value)
                    row += 1
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{path}: row group {group} cannot be read ({_first_line(err)})") from None


def _arrow_dir_documents(path: str, key: str, text_field: str) -> Iterator[Document]:
    import pyarrow as pa

    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".arrow")
    if not files:
        raise CorpusError(f"{path}: an HF save_to_disk directory without .arrow files")
    row = 0
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                if text_field not in reader.schema.names:
                    raise CorpusError(f"{file} has no column {text_field!r} (columns: "
                                      f"{', '.join(reader.schema.names)}; set data.text_field)")
                for batch in reader:
                    for value in batch.column(text_field).to_pylist():
                        if not isinstance(value, str):
                            raise CorpusError(f"{file}: row {row} has no string {text_field!r}")
                        yield Document(f"{key}:{row}", value)
                        row += 1
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{file}: not a readable Arrow stream ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]
