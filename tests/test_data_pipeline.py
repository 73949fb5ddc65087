"""Token windows in ArrayRecord and the grain iterators: stream layout, shuffling, resume, multi-process slices."""

import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from dsv3_jax.data import pipeline, prepare_data, shards
from dsv3_jax.data.corpus import prepare_corpus
from dsv3_jax.data.pipeline import DataError, build_dataset
from dsv3_jax.data.tokenizer import get_tokenizer

SEQ_LEN, MTP = 30, 2
WINDOW = SEQ_LEN + 1 + MTP
VOCAB = 400


def _write_corpus(root, n_docs=24, seed=0):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("etaoinshrdlucmfw"), size=int(k))) for k in rng.integers(2, 8, size=300)]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        paragraphs = [" ".join(rng.choice(words, size=50)) for _ in range(int(rng.integers(2, 6)))]
        (root / f"d{i:02d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = _write_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("cache")
    corpus = prepare_corpus(f"files:{root}/*.txt", val_fraction=0.2)
    tok = get_tokenizer(corpus, VOCAB, cache)
    ds = build_dataset(corpus, tok, SEQ_LEN, MTP, cache, vocab_size=VOCAB)
    return corpus, tok, ds, cache


def _all_windows(paths):
    out = []
    for path in paths:
        reader = ArrayRecordReader(str(path))
        out += [np.frombuffer(r, np.uint16).astype(np.int32) for r in reader.read_all()]
        reader.close()
    return np.stack(out)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_windows_are_the_concatenated_token_stream(env):
    corpus, tok, ds, _ = env
    assert ds.window == WINDOW and ds.dtype == "<u2"
    for split, docs in ((ds.train, corpus.train_docs()), (ds.val, corpus.val_docs())):
        stream = np.concatenate([np.array(tok.encode(d) + [tok.eos_id]) for d in docs])
        assert split.n_tokens == stream.size and split.n_windows == stream.size // WINDOW
        windows = _all_windows(split.paths)
        np.testing.assert_array_equal(windows, stream[:split.n_windows * WINDOW].reshape(-1, WINDOW))
        reader = ArrayRecordReader(str(split.paths[0]))
        assert len(reader.read([0])[0]) == WINDOW * 2  # stored as uint16
        reader.close()
    assert ds.train.n_windows > 100 and ds.val.n_windows > 16


def test_window_writer_shards_and_carries_the_unfinished_window_across_a_restore(tmp_path):
    writer = shards.WindowWriter(tmp_path, "t", window=4, dtype=np.dtype("<u2"))
    writer.add(np.arange(10))  # two windows, two tokens pending
    assert writer.shard_windows == 2
    writer.close_shard()
    state = writer.state()
    assert state["pending"] == [8, 9] and state["n_windows"] == 2
    again = shards.WindowWriter(tmp_path, "t", window=4, dtype=np.dtype("<u2"))
    again.restore(state)
    again.add(np.arange(10, 31))
    again.close_shard()
    stats = again.stats()
    assert stats["shards"] == ["t-00000.array_record", "t-00001.array_record"]
    assert stats["n_windows"] == 7 and stats["n_dropped_tokens"] == 3 and stats["max_token_id"] == 30
    np.testing.assert_array_equal(_all_windows([tmp_path / s for s in stats["shards"]]).ravel(), np.arange(28))
    with pytest.raises(ValueError, match="out of range"):
        again.add(np.array([70000]))


def test_cache_is_reused(env, monkeypatch):
    corpus, tok, ds, cache = env
    monkeypatch.setattr(pipeline, "build_windows", lambda *a, **k: pytest.fail("windows must come from the cache"))
    again = build_dataset(corpus, tok, SEQ_LEN, MTP, cache, vocab_size=VOCAB)
    assert again.directory == ds.directory and again.train == ds.train
    # The cache is keyed by the window length: seq_len and mtp_depth giving the same window share it.
    same_window = build_dataset(corpus, tok, SEQ_LEN + 1, MTP - 1, cache, vocab_size=VOCAB)
    assert same_window.directory == ds.directory and same_window.seq_len == SEQ_LEN + 1


def test_each_epoch_is_a_fresh_permutation(env):
    _, _, ds, _ = env
    all_rows = {w.tobytes() for w in _all_windows(ds.train.paths)}
    assert len(all_rows) == ds.train.n_windows  # windows are distinct, so rows identify them
    n = ds.train.n_windows
    with ds.train_iterator(1, seed=3, process_index=0, process_count=1) as it:
        epochs = [np.concatenate(_take(it, n)) for _ in range(2)]
    for epoch in epochs:
        assert {w.tobytes() for w in epoch} == all_rows  # every window once
    assert not np.array_equal(epochs[0], epochs[1])
    batch = 8  # with a remainder: whole batches only, still no repeats inside an epoch
    with ds.train_iterator(batch, seed=3, process_index=0, process_count=1) as it:
        assert ds.steps_per_epoch(batch) == n // batch
        for _ in range(2):
            rows = np.concatenate(_take(it, n // batch))
            assert len({w.tobytes() for w in rows}) == (n // batch) * batch
            assert {w.tobytes() for w in rows} <= all_rows


def test_seed_decides_the_order(env):
    _, _, ds, _ = env
    def first(seed):
        with ds.train_iterator(4, seed=seed, process_index=0, process_count=1) as it:
            return np.concatenate(_take(it, 3))
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_resume_is_exact_across_epochs(env):
    _, _, ds, _ = env
    batch = 32
    assert ds.steps_per_epoch(batch) < 12  # the 12 batches below cross an epoch boundary
    with ds.train_iterator(batch, seed=7, process_index=0, process_count=1) as it:
        first = _take(it, 7)
        state = json.loads(json.dumps(it.get_state()))  # it travels as JSON in checkpoints
        expected = _take(it, 5)
    assert first[0].shape == (batch, WINDOW) and first[0].dtype == np.int32
    with ds.train_iterator(batch, seed=7, process_index=0, process_count=1) as fresh:
        fresh.set_state(state)
        assert fresh.step == 7
        for got, want in zip(_take(fresh, 5), expected):
            np.testing.assert_array_equal(got, want)


def test_processes_get_disjoint_slices_of_the_global_batch(env):
    _, _, ds, _ = env
    batch, steps = 8, 6
    with ds.train_iterator(batch, seed=1, process_index=0, process_count=1) as it:
        global_batches = _take(it, steps)
    for count in (2, 4):
        iters = [ds.train_iterator(batch, seed=1, process_index=p, process_count=count) for p in range(count)]
        per_process = [_take(it, steps) for it in iters]
        for it in iters:
            it.close()
        for step in range(steps):
            parts = [per_process[p][step] for p in range(count)]
            assert all(part.shape == (batch // count, WINDOW) for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), global_batches[step])
    # A state saved on one process count resumes the same global batches on another.
    with ds.train_iterator(batch, seed=1, process_index=0, process_count=1) as it:
        _take(it, 3)
        state = it.get_state()
    halves = []
    for p in range(2):
        with ds.train_iterator(batch, seed=1, process_index=p, process_count=2) as it:
            it.set_state(state)
            halves.append(next(it))
    np.testing.assert_array_equal(np.concatenate(halves), global_batches[3])


def test_validation_batches_cover_the_split_in_order(env):
    _, _, ds, _ = env
    batch = 4
    windows = _all_windows(ds.val.paths)
    full = list(ds.val_batches(batch, process_index=0, process_count=1))
    assert len(full) == ds.val_steps(batch) == ds.val.n_windows // batch  # the partial last batch is dropped
    np.testing.assert_array_equal(np.concatenate(full), windows[:len(full) * batch])
    assert full[0].dtype == np.int32
    halves = [list(ds.val_batches(batch, process_index=p, process_count=2)) for p in range(2)]
    for step, whole in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), whole)
    gen = ds.val_batches(batch, 0, 1)
    next(gen)
    gen.close()  # stopping early releases the readers


def test_state_from_other_settings_is_refused(env):
    _, _, ds, _ = env
    with ds.train_iterator(8, seed=0, process_index=0, process_count=1) as it:
        next(it)
        state = it.get_state()
    with ds.train_iterator(4, seed=0, process_index=0, process_count=1) as other:
        with pytest.raises(DataError, match="batch_size: saved 8, now 4"):
            other.set_state(state)
        with pytest.raises(DataError, match="not a dsv3_jax data-iterator state"):
            other.set_state({"next_index": 3})


def test_batch_and_process_errors(env):
    _, _, ds, _ = env
    with pytest.raises(DataError, match="batch_size 6 is not divisible by the process count 4"):
        ds.train_iterator(6, process_index=0, process_count=4)
    with pytest.raises(DataError, match="process_index must be in"):
        ds.train_iterator(8, process_index=2, process_count=2)
    too_many = ds.train.n_windows + 1
    with pytest.raises(DataError, match=rf"train split has {ds.train.n_tokens:,} tokens = {ds.train.n_windows} "
                                        rf"windows of {WINDOW}, fewer than one batch of {too_many}"):
        ds.train_iterator(too_many, process_index=0, process_count=1)
    with pytest.raises(DataError, match="validation split has .* fewer than one batch"):
        ds.val_batches(ds.val.n_windows + 1, process_index=0, process_count=1)
    with pytest.raises(DataError, match="validation split"):
        ds.check_batch_size(ds.val.n_windows + 1, process_count=1)


def test_vocab_overflow_is_refused_before_encoding(env, monkeypatch):
    corpus, tok, _, cache = env
    monkeypatch.setattr(pipeline, "build_windows", lambda *a, **k: pytest.fail("nothing may be encoded"))
    with pytest.raises(DataError, match=f"the tokenizer has {VOCAB} ids but vocab_size is 300"):
        build_dataset(corpus, tok, SEQ_LEN + 50, MTP, cache / "other", vocab_size=300)


def test_split_shorter_than_a_window_is_refused(env):
    corpus, tok, _, cache = env
    val_tokens = sum(len(tok.encode(d)) + 1 for d in corpus.val_docs())
    with pytest.raises(DataError, match=f"the validation split .* has {val_tokens:,} tokens, fewer than one "
                                        f"window of {val_tokens + 1}"):
        build_dataset(corpus, tok, val_tokens, 0, cache)
    # The failed build left no partial directory behind (only the builders' lock file).
    assert not [p for p in (cache / "tokens").glob(".*") if p.is_dir()]


def test_prepare_data_end_to_end(tmp_path, capsys):
    root = _write_corpus(tmp_path / "corpus", n_docs=12, seed=5)
    data = prepare_data(f"files:{root}/*.txt", 300, seq_len=15, mtp_depth=1, cache_dir=tmp_path / "cache",
                        batch_size=4, process_count=1)
    assert "data: tokenizer" in capsys.readouterr().err
    with data.train_iterator(4, seed=0, process_index=0, process_count=1) as it:
        batch = next(it)
    assert batch.shape == (4, 17) and batch.max() < 300
    assert data.tokenizer.decode(batch[0]).strip()
    with pytest.raises(DataError, match="not divisible by the process count 3"):
        prepare_data(f"files:{root}/*.txt", 300, 15, 1, tmp_path / "cache", batch_size=4, process_count=3)
    with pytest.raises(DataError, match="fewer than one batch"):
        prepare_data(f"files:{root}/*.txt", 300, 15, 1, tmp_path / "cache", batch_size=10 ** 6, process_count=1,
                     verbose=False)
