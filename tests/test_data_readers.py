"""`files:` corpora in every format the readers take (dsv3_jax/data/readers.py): the same documents from
.jsonl, .jsonl.gz, .jsonl.zst, Parquet (several row groups) and an HF save_to_disk directory; keys that name
file and line/row; and one CorpusError naming the file (and line or row group) for each kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dsv3_jax.data.documents import CorpusError
from dsv3_jax.data.sources import files_documents

TEXTS = ["first document\nwith two lines", "second: ünïcödé ✓", "third " * 50, "fourth"]


def _jsonl(texts, field="text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write_all_formats(directory: Path, field: str = "text") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.jsonl").write_bytes(_jsonl(TEXTS, field))
    (directory / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(TEXTS, field)))
    (directory / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(TEXTS, field)))
    pq.write_table(pa.table({field: TEXTS, "id": list(range(4))}), directory / "d.parquet", row_group_size=3)
    arrow_dir = directory / "e_dataset"  # the layout of datasets.Dataset.save_to_disk
    arrow_dir.mkdir()
    table = pa.table({field: TEXTS})
    with pa.ipc.new_stream(str(arrow_dir / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    (arrow_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_every_format_gives_the_same_documents_with_stable_keys(tmp_path):
    write_all_formats(tmp_path / "c")
    docs = files_documents(f"{tmp_path}/c/*")
    by_file: dict[str, list[str]] = {}
    for d in docs:
        by_file.setdefault(d.key.split(":")[0], []).append(d.text)
    assert sorted(by_file) == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e_dataset"]
    assert all(texts == TEXTS for texts in by_file.values())
    keys = [d.key for d in docs]
    assert keys[:4] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:4"]  # JSON lines by line number
    assert keys[12:16] == ["d.parquet:0", "d.parquet:1", "d.parquet:2", "d.parquet:3"]  # rows across row groups


def test_another_text_field(tmp_path):
    write_all_formats(tmp_path / "c", field="content")
    assert len(files_documents(f"{tmp_path}/c/*", text_field="content")) == 5 * len(TEXTS)
    with pytest.raises(CorpusError, match=r"a\.jsonl:1 has no string 'text' field \(set data.text_field"):
        files_documents(f"{tmp_path}/c/a.jsonl")
    with pytest.raises(CorpusError, match=r"d\.parquet has no column 'text' \(columns: content, id"):
        files_documents(f"{tmp_path}/c/d.parquet")
    with pytest.raises(CorpusError, match=r"data-00000-of-00001\.arrow has no column 'text'"):
        files_documents(f"{tmp_path}/c/e_dataset")


@pytest.mark.parametrize("name, damage, message", [
    ("x.jsonl.gz", lambda b: b[: len(b) // 2], r"x\.jsonl\.gz: cannot be read past line"),
    ("x.jsonl.zst", lambda b: b[:10] + b"\x00" * 40 + b[50:], r"x\.jsonl\.zst: cannot be read past line"),
    ("x.parquet", lambda b: b[:100] + b"\x00" * 200 + b[300:], r"x\.parquet: (not a readable Parquet file|row group)"),
    ("x.jsonl", lambda b: b.replace(b"fourth", b"fo\xffrth"), r"x\.jsonl:4 is not valid UTF-8"),
    ("x.jsonl", lambda b: b.replace(b'"id": 2}', b'"id": 2'), r"x\.jsonl:3 is not valid JSON"),
])
def test_bad_input_names_the_file_and_place(tmp_path, name, damage, message):
    good = tmp_path / "good"
    write_all_formats(good)
    source = {"x.jsonl.gz": "b.jsonl.gz", "x.jsonl.zst": "c.jsonl.zst", "x.parquet": "d.parquet",
              "x.jsonl": "a.jsonl"}[name]
    (tmp_path / name).write_bytes(damage((good / source).read_bytes()))
    with pytest.raises(CorpusError, match=message):
        files_documents(str(tmp_path / name))


def test_unsupported_files_are_named(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(CorpusError, match=r"unsupported type, e\.g\. .*notes\.md.*\.parquet and HF save_to_disk"):
        files_documents(f"{tmp_path}/*")
