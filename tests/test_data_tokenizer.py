"""Byte-level BPE: exact round trip, the separator, determinism and the cache (trained on stdlib sources)."""

import pytest

from dsv3_jax.data import tokenizer as tokenizer_mod
from dsv3_jax.data.corpus import Corpus
from dsv3_jax.data.sources import load_documents
from dsv3_jax.data.tokenizer import EOS_TOKEN, get_tokenizer, load_tokenizer, train_bpe

VOCAB = 1024


@pytest.fixture(scope="module")
def stdlib_corpus():
    docs = load_documents("stdlib")
    return Corpus("stdlib-part", tuple(docs[:150]))  # ~2 MB: enough for merges, quick to train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def tok(stdlib_corpus, cache):
    return get_tokenizer(stdlib_corpus, VOCAB, cache)


TRICKY = ["", " ", "  leading spaces", "trailing  \n\n", "\r\n\tmixed\x00nul", "ünïcödé, 日本語, emoji 🙂🙃",
          "def f(x):\n    return x  # comment\n", "a" * 3000, "\u200b zero width \ufeff bom", EOS_TOKEN]


def test_round_trip_is_exact(tok, stdlib_corpus):
    for text in TRICKY + stdlib_corpus.val_docs()[:20]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert [tok.decode(ids) for ids in tok.encode_batch(TRICKY)] == TRICKY


def test_separator_is_known_and_text_never_becomes_it(tok):
    assert tok.eos_id == 0 and tok.inner.id_to_token(0) == EOS_TOKEN
    ids = tok.encode(f"end of one{EOS_TOKEN}start of next")
    assert tok.eos_id not in ids
    assert tok.decode([*tok.encode("a"), tok.eos_id, *tok.encode("b")]) == f"a{EOS_TOKEN}b"


def test_vocab_size_and_compression(tok, stdlib_corpus):
    assert tok.vocab_size == VOCAB
    text = "".join(stdlib_corpus.val_docs())
    assert len(text.encode()) / len(tok.encode(text)) > 2.5  # BPE learned something


def test_training_is_deterministic(stdlib_corpus, tok):
    again = train_bpe(stdlib_corpus.train_docs(), VOCAB)
    assert again.to_str() == tok.path.read_text()


def test_cache_is_reused_and_keyed_by_corpus_and_vocab(stdlib_corpus, cache, tok, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer must be reused")
    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    again = get_tokenizer(stdlib_corpus, VOCAB, cache)
    assert again.path == tok.path and again.hash == tok.hash
    assert load_tokenizer(tok.path.parent).hash == tok.hash
    assert tokenizer_mod.tokenizer_dir(stdlib_corpus, 512, cache) != tok.path.parent
    other = Corpus("stdlib-part", stdlib_corpus.documents[:-1])
    assert tokenizer_mod.tokenizer_dir(other, VOCAB, cache) != tok.path.parent


def test_too_small_vocab_is_refused():
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_bpe(["some text"], 100)
