"""Encoding a corpus into window shards (dsv3_jax/data/build.py): worker processes change nothing, an interrupted
build resumes to the same bytes, the split's fallbacks hold while streaming, and a build is never half-used."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dsv3_jax.data import build
from dsv3_jax.data.corpus import Corpus, prepare_corpus
from dsv3_jax.data.pipeline import base_meta, build_dataset, cache_dir_for
from dsv3_jax.data.shards import token_dtype
from dsv3_jax.data.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB, WINDOW = 400, 33
UNIT_CHARS, SHARD_BYTES = 3000, 2000  # many units and many checkpoints from a small corpus


def _write_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("etaoinshrdlucmfw"), size=int(k))) for k in rng.integers(2, 8, size=300)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(n_docs):
            paragraphs = [" ".join(rng.choice(words, size=60)) for _ in range(int(rng.integers(2, 8)))]
            f.write(json.dumps({"text": "\n\n".join(paragraphs) + "\n"}) + "\n")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = _write_corpus(tmp_path_factory.mktemp("corpus"))
    corpus = prepare_corpus(f"files:{root}/*.jsonl", val_fraction=0.2, chunk_chars=400)
    tokenizer = get_tokenizer(corpus, VOCAB, tmp_path_factory.mktemp("tok"))
    return corpus, tokenizer


def _build(corpus, tokenizer, cache: Path, workers: int, **kwargs) -> tuple[Path, dict]:
    directory = cache_dir_for(corpus, tokenizer, WINDOW, cache)
    _, meta = build.build_windows(corpus, tokenizer, WINDOW, token_dtype(tokenizer.vocab_size), directory,
                                  base_meta(corpus.name, corpus.hash, tokenizer), workers=workers, unit_chars=UNIT_CHARS,
                                  shard_bytes=SHARD_BYTES, **kwargs)
    return directory, meta


def _shard_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.array_record"))}


def _stream(tokenizer, texts) -> np.ndarray:
    return np.concatenate([np.array(tokenizer.encode(t) + [tokenizer.eos_id]) for t in texts])


def test_worker_processes_write_the_same_bytes_as_one_and_the_stream_is_the_split(env, tmp_path):
    corpus, tokenizer = env
    one_dir, one = _build(corpus, tokenizer, tmp_path / "one", workers=1)
    two_dir, two = _build(corpus, tokenizer, tmp_path / "two", workers=2)
    assert one["units"] > 10 and len(one["splits"]["train"]["shards"]) > 3  # pool, several checkpoints
    assert _shard_hashes(one_dir) == _shard_hashes(two_dir) and len(_shard_hashes(one_dir)) > 4
    assert one["splits"] == two["splits"] and one["corpus_content_hash"] == corpus.content_hash
    in_memory = Corpus(corpus.name, tuple(corpus.iter_documents()), corpus.val_fraction, corpus.chunk_chars)
    assert one["corpus_hash"] == in_memory.hash != corpus.hash  # streamed: the content identity, found on the way
    assert one["n_documents"] == 60
    # The oracle: the in-memory split, encoded in one piece.
    ds = build_dataset(corpus, tokenizer, WINDOW - 1, 0, tmp_path / "one", vocab_size=VOCAB)
    for split, texts in ((ds.train, corpus.train_docs()), (ds.val, corpus.val_docs())):
        stream = _stream(tokenizer, texts)
        assert split.n_tokens == stream.size and split.n_docs == len(texts)
        windows = np.concatenate([np.frombuffer(r, np.uint16) for r in _records(split.paths)])
        np.testing.assert_array_equal(windows, stream[:split.n_windows * WINDOW])
    assert not list(tmp_path.glob("*/tokens/.*.partial"))  # renamed into place


def _records(paths):
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for path in paths:
        reader = ArrayRecordReader(str(path))
        out += reader.read_all()
        reader.close()
    return out


# No `if __name__ == "__main__":` guard, on purpose: the spawned workers must not run the script again.
_KILLED_BUILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dsv3_jax.data import build
    from dsv3_jax.data.corpus import Corpus, prepare_corpus
    from dsv3_jax.data.pipeline import base_meta, cache_dir_for
    from dsv3_jax.data.shards import token_dtype
    from dsv3_jax.data.tokenizer import load_tokenizer

    pattern, tokenizer_path, cache = sys.argv[1:]
    corpus = prepare_corpus(f"files:{pattern}", val_fraction=0.2, chunk_chars=400)
    tokenizer = load_tokenizer(tokenizer_path)
    directory = cache_dir_for(corpus, tokenizer, %d, cache)
    build.build_windows(corpus, tokenizer, %d, token_dtype(tokenizer.vocab_size), directory,
                        base_meta(corpus.name, corpus.hash, tokenizer),
                        workers=2, unit_chars=%d, shard_bytes=%d, progress=lambda p: __import__("time").sleep(0.05))
""" % (WINDOW, WINDOW, UNIT_CHARS, SHARD_BYTES))


def test_a_killed_build_resumes_to_the_bytes_of_an_uninterrupted_one(env, tmp_path):
    corpus, tokenizer = env
    pattern = corpus.name[len("files:"):]
    cache = tmp_path / "killed"
    script = tmp_path / "build.py"
    script.write_text(_KILLED_BUILD)
    env_vars = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), pattern, str(tokenizer.path), str(cache)], env=env_vars,
                            start_new_session=True)
    directory = cache_dir_for(corpus, tokenizer, WINDOW, cache)
    progress = directory.parent / f".{directory.name}.partial" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it (and its workers) after a few checkpoints, mid-build
        if progress.is_file() and json.loads(progress.read_text())["units_done"] >= 4:
            break
        assert proc.poll() is None, "the build ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (directory / "meta.json").exists()  # an interrupted build is never the finished one
    saved = json.loads(progress.read_text())["units_done"]
    logs = []
    _, resumed = _build(corpus, tokenizer, cache, workers=2, log=logs.append)
    assert logs and f"after {saved} units" in logs[0], logs
    clean_dir, clean = _build(corpus, tokenizer, tmp_path / "clean", workers=1)
    assert _shard_hashes(directory) == _shard_hashes(clean_dir)
    assert resumed["splits"] == clean["splits"] and resumed["corpus_content_hash"] == clean["corpus_content_hash"]
    assert resumed["n_documents"] == clean["n_documents"] == 60


def test_a_partial_build_of_other_settings_is_discarded_not_resumed(env, tmp_path):
    corpus, tokenizer = env
    directory = cache_dir_for(corpus, tokenizer, WINDOW, tmp_path)
    partial = directory.parent / f".{directory.name}.partial"
    partial.mkdir(parents=True)
    (partial / "progress.json").write_text(json.dumps({"identity": {"other": 1}, "units_done": 5}))
    (partial / "train-00000.array_record").write_bytes(b"garbage")
    logs = []
    _, meta = _build(corpus, tokenizer, tmp_path, workers=1, log=logs.append)
    assert not logs and meta["units"] > 10
    clean_dir, _ = _build(corpus, tokenizer, tmp_path / "clean", workers=1)
    assert _shard_hashes(directory) == _shard_hashes(clean_dir)


def test_streamed_split_keeps_the_fallback_of_holding_out_one_chunk(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    for i in range(3):
        (root / f"d{i}.txt").write_text(" ".join(f"w{i}x{j}" for j in range(80)) + "\n")
    corpus = prepare_corpus(f"files:{root}/*.txt", val_fraction=0.001)  # no chunk scores below 0.001
    tokenizer = get_tokenizer(corpus, 300, tmp_path / "tok")
    directory = cache_dir_for(corpus, tokenizer, 8, tmp_path)
    _, meta = build.build_windows(corpus, tokenizer, 8, token_dtype(300), directory, {}, workers=2, unit_chars=10)
    assert meta["splits"]["val"]["n_docs"] == 1 and meta["splits"]["train"]["n_docs"] == 2
    assert meta["splits"]["val"]["n_tokens"] == _stream(tokenizer, corpus.val_docs()).size
    assert meta["splits"]["train"]["n_tokens"] == _stream(tokenizer, corpus.train_docs()).size


def test_touched_files_with_the_same_documents_reuse_the_same_windows(tmp_path):
    root = _write_corpus(tmp_path / "c", n_docs=20)
    cache = tmp_path / "cache"
    first = prepare_corpus(f"files:{root}/*.jsonl", val_fraction=0.2, chunk_chars=400)
    tokenizer = get_tokenizer(first, VOCAB, tmp_path / "tok")
    a = build_dataset(first, tokenizer, WINDOW - 1, 0, cache, vocab_size=VOCAB)
    stat = (root / "docs.jsonl").stat()
    os.utime(root / "docs.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # same bytes, new mtime
    touched = prepare_corpus(f"files:{root}/*.jsonl", val_fraction=0.2, chunk_chars=400)
    assert touched.hash != first.hash  # the manifest changed, so the files are read again ...
    logs = []
    b = build_dataset(touched, tokenizer, WINDOW - 1, 0, cache, vocab_size=VOCAB, log=logs.append)
    assert b.directory == a.directory and b.key == a.key  # ... and found to hold the same documents
    assert any("same documents" in line for line in logs)
    (root / "docs.jsonl").write_text((root / "docs.jsonl").read_text().replace('"text": "', '"text": "An edit. ', 1))
    edited = prepare_corpus(f"files:{root}/*.jsonl", val_fraction=0.2, chunk_chars=400)
    c = build_dataset(edited, tokenizer, WINDOW - 1, 0, cache, vocab_size=VOCAB)
    assert c.directory != a.directory and c.corpus_hash != a.corpus_hash


def test_prepare_command_summarises_and_reuses(tmp_path):
    from cli_support import run_cli

    root = _write_corpus(tmp_path / "c", n_docs=30)
    args = ["prepare", "--preset", "tiny", "--corpus", f"files:{root}/*.jsonl", "--set", "data.workers=2",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "preparing files:" in first.stderr  # the progress bar
    line = first.stdout.strip()
    assert line.startswith(f"prepared files:{root}/*.jsonl: 30 documents, ") and " shards -> " in line
    again = run_cli([*args, "--json"], tmp_path)
    out = json.loads(again.stdout)
    assert out["reused"] is True and out["documents"] == 30 and out["tokens"] == out["train"]["n_tokens"] + \
        out["val"]["n_tokens"] and out["bytes_per_token"] > 1 and out["shards"] >= 2
    assert line.endswith(out["directory"])
