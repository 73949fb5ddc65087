"""`tokens:DIR`: token shards produced elsewhere (.npy, .bin, .array_record) re-cut into windows, their split,
and every malformed input refused with the file named, before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from cli_support import run_cli
from dsv3_jax.data import prepare_data
from dsv3_jax.data.documents import CorpusError, DataError
from dsv3_jax.data.tokenizer import train_bpe

VOCAB, SEQ_LEN, MTP = 300, 14, 1
WINDOW = SEQ_LEN + 1 + MTP


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    tok = train_bpe(["the quick brown fox jumps over the lazy dog\n" * 20], VOCAB)
    (directory / "tokenizer.json").write_text(tok.to_str())
    return directory


def _stream(rng, n_docs: int, vocab: int = VOCAB) -> np.ndarray:
    """Documents of random ids in [1, vocab) each ended by the separator 0 (`<|endoftext|>`)."""
    return np.concatenate([np.append(rng.integers(1, vocab, size=int(rng.integers(5, 60))), 0)
                           for _ in range(n_docs)])


def _windows(dataset, split) -> np.ndarray:
    out = []
    for path in split.paths:
        reader = ArrayRecordReader(str(path))
        out += [np.frombuffer(r, dataset.dtype) for r in reader.read_all()]
        reader.close()
    return np.stack(out).astype(np.int64)


def _prepare(source: Path, tokenizer_dir: Path, cache: Path, **kwargs):
    return prepare_data(f"tokens:{source}", VOCAB, SEQ_LEN, MTP, cache, tokenizer_path=tokenizer_dir,
                        verbose=False, **kwargs)


def test_npy_shards_with_val_shards_are_the_two_streams_cut_into_windows(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    train = [_stream(rng, 40), _stream(rng, 30)]
    val = _stream(rng, 20)
    np.save(src / "train_000.npy", train[0].astype(np.uint16))
    np.save(src / "train_001.npy", train[1].astype(np.int32))  # any of the allowed dtypes, per file
    np.save(src / "val_000.npy", val.astype(np.uint32))
    data = _prepare(src, tokenizer_dir, tmp_path / "cache")
    for split, stream in ((data.train, np.concatenate(train)), (data.val, val)):
        assert split.n_tokens == stream.size and split.n_windows == stream.size // WINDOW
        np.testing.assert_array_equal(_windows(data, split).ravel(), stream[:split.n_windows * WINDOW])
    assert data.train.n_docs == 70 and data.val.n_docs == 20  # separators counted
    with data.train_iterator(4, seed=1, process_index=0, process_count=1) as it:
        assert next(it).shape == (4, WINDOW)
    again = _prepare(src, tokenizer_dir, tmp_path / "cache")  # the finished windows are reused
    assert again.directory == data.directory and again.train == data.train


def test_bin_and_array_record_shards_without_val_shards_split_by_hashed_window(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    first, second = _stream(rng, 80), _stream(rng, 80)
    first.astype("<u4").tofile(src / "a.bin")
    writer = ArrayRecordWriter(str(src / "b.array_record"), "group_size:1")
    for piece in np.array_split(second, 7):
        writer.write(piece.astype("<u4").tobytes())
    writer.close()
    data = _prepare(src, tokenizer_dir, tmp_path / "cache", token_dtype="uint32", val_fraction=0.2)
    stream = np.concatenate([first, second])
    windows = stream[:stream.size // WINDOW * WINDOW].reshape(-1, WINDOW)
    got_train, got_val = _windows(data, data.train), _windows(data, data.val)
    assert len(got_train) + len(got_val) == len(windows) and len(got_val) >= 1
    # every window lands on exactly one side, in stream order on each
    rows = {w.tobytes(): i for i, w in enumerate(windows)}
    train_idx, val_idx = [rows[w.tobytes()] for w in got_train], [rows[w.tobytes()] for w in got_val]
    assert train_idx == sorted(train_idx) and val_idx == sorted(val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(windows)))
    meta = json.loads((data.directory / "meta.json").read_text())
    assert meta["validation"] == "hashed windows at 0.2"


@pytest.mark.parametrize("make, message", [
    (lambda d: np.save(d / "x.npy", np.array([1, 2, 300], np.uint16)), r"x.npy holds token id 300 >= model.vocab_size"),
    (lambda d: np.save(d / "x.npy", np.zeros(0, np.uint16)), r"x.npy: an empty token shard"),
    (lambda d: np.save(d / "x.npy", np.ones(8, np.float32)), r"x.npy: tokens of dtype float32"),
    (lambda d: np.save(d / "x.npy", np.ones((2, 8), np.uint16)), r"x.npy: a token shard is 1-D"),
    (lambda d: (d / "x.bin").write_bytes(b"\x01\x00\x02"), r"x.bin: 3 bytes is not a whole number of uint16"),
    (lambda d: (d / "x.npy").write_bytes(b"not numpy"), r"x.npy: not a readable .npy file"),
    (lambda d: (d / "notes.txt").write_text("hi"), r"holds no token shard"),
])
def test_malformed_shards_are_refused_naming_the_file(tmp_path, tokenizer_dir, make, message):
    src = tmp_path / "src"
    src.mkdir()
    make(src)
    with pytest.raises((CorpusError, DataError), match=message):
        _prepare(src, tokenizer_dir, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name.endswith(".partial")]


def test_token_shards_need_the_tokenizer_that_made_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "x.npy", np.arange(100, dtype=np.uint16))
    with pytest.raises(DataError, match="name the tokenizer that produced them"):
        prepare_data(f"tokens:{src}", VOCAB, SEQ_LEN, MTP, tmp_path / "cache", verbose=False)
    proc = run_cli(["prepare", "--preset", "tiny", "--corpus", f"tokens:{src}"], tmp_path)
    assert proc.returncode == 2 and "data.tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_command_on_token_shards(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "train.npy", _stream(rng, 200).astype(np.uint16))
    np.save(src / "val.npy", _stream(rng, 40).astype(np.uint16))
    args = ["prepare", "--preset", "tiny", "--corpus", f"tokens:{src}", "--set", f"data.tokenizer={tokenizer_dir}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"model.vocab_size={VOCAB}", "--json"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["tokens"] > 0 and out["train"]["n_docs"] == 200 and out["val"]["n_docs"] == 40
    assert out["reused"] is False
    again = json.loads(run_cli(args, tmp_path).stdout)
    assert again["reused"] is True and again["directory"] == out["directory"]
