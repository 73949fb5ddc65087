"""Tokenizers: the byte-level BPE trained with HF `tokenizers` on a corpus's train split (its first
`BPE_TRAIN_MAX_CHARS` characters; cached by corpus hash, the default), or any HF `tokenizer.json` the user names (`data.tokenizer`, e.g. DeepSeek-V3's own).

Byte level: every string encodes (no unknown token) and `decode(encode(s)) == s` exactly. The one special
token, `<|endoftext|>` (id 0), separates documents in the token stream; `encode` treats that string in text
literally (as ordinary bytes), so only the pipeline inserts the separator. Training is deterministic: the same
corpus and vocabulary size give a byte-identical `tokenizer.json`.

A given tokenizer's separator is its end-of-text token, found in this order: the `eos_token` of a
`tokenizer_config.json` beside the file (as HF hub checkpoints ship it), then `<|endoftext|>`, then the
common names in `KNOWN_EOS_TOKENS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax.data.corpus import Corpus
from dsv3_jax.data.fetch import resolve_cache_dir

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens of common tokenizers, tried after tokenizer_config.json and EOS_TOKEN: DeepSeek-V3/R1,
# Llama/Mistral/T5-style, Gemma, Llama 3, ChatML.
KNOWN_EOS_TOKENS = ("<｜end▁of▁sentence｜>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
TOKENIZER_CONFIG = "tokenizer_config.json"
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 257  # 256 byte symbols + the separator
# The default tokenizer learns from the first this-many characters of the train split: merges settle long
# before that, and training memory stays bounded on corpora larger than memory.
BPE_TRAIN_MAX_CHARS = 64 * 2 ** 20
_RECIPE = "bytelevel-bpe-v1"  # bump when the training recipe changes: it is part of the cache key


class Tokenizer:
    """A tokenizer file: encode/decode text, the separator (end-of-text) token and id, and the file's hash."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        data = self.path.read_bytes()
        self.hash = hashlib.sha256(data).hexdigest()
        try:
            self.inner = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception
            raise ValueError(f"{self.path}: not a valid tokenizer.json ({' '.join(str(err).split())[:200]})") from None
        self.eos_token: str = _end_of_text(self.inner, self.path)
        self.eos_id: int = self.inner.token_to_id(self.eos_token)
        # Text that happens to contain "<|endoftext|>" must not turn into the separator.
        self.inner.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Number of ids, special token included (every id is < vocab_size)."""
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no separator added)."""
        try:
            return self.inner.encode(text, add_special_tokens=False).ids
        except Exception as err:  # noqa: BLE001 - the Rust library raises a bare Exception
            raise self._encode_error(err) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel."""
        try:
            return [e.ids for e in self.inner.encode_batch_fast(list(texts), add_special_tokens=False)]
        except Exception as err:  # noqa: BLE001
            raise self._encode_error(err) from None

    def _encode_error(self, err: Exception) -> ValueError:
        """What the tokenizers library raises (e.g. a word-level model with no unknown token meeting a word
        outside its vocabulary: `Missing [UNK] token`) as one line naming the file."""
        reason = " ".join(str(err).split())[:200]
        hint = "; give it an unknown token (unk_token)" if "UNK" in reason.upper() else ""
        return ValueError(f"{self.path}: this tokenizer cannot encode the text ({reason}){hint}")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the separator decodes to `<|endoftext|>`."""
        return self.inner.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, path={str(self.path)!r})"


def _end_of_text(inner: tokenizers.Tokenizer, path: Path) -> str:
    """The tokenizer's end-of-text token (module docstring); a ValueError naming the file if it has none."""
    config = path.parent / TOKENIZER_CONFIG
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{config}: not a valid tokenizer config ({err})") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and inner.token_to_id(eos) is not None:
            return eos
        if eos is not None:
            raise ValueError(f"{config}: eos_token {eos!r} is not a token of {path}")
    for name in (EOS_TOKEN, *KNOWN_EOS_TOKENS):
        if inner.token_to_id(name) is not None:
            return name
    raise ValueError(f"{path} has no end-of-text token (none of {', '.join((EOS_TOKEN, *KNOWN_EOS_TOKENS))}); "
                     f"name it as eos_token in a {TOKENIZER_CONFIG} beside the file")


def train_bpe(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """A byte-level BPE with `<|endoftext|>` as id 0, trained on `texts` (at most `vocab_size` ids)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def tokenizer_dir(corpus: Corpus, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the tokenizer for (corpus, vocab_size) is cached."""
    key = hashlib.sha256(f"{_RECIPE}:{corpus.hash}:{vocab_size}".encode()).hexdigest()[:16]
    return resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a saved `tokenizer.json` (or the directory holding one)."""
    path = Path(path).expanduser()
    return Tokenizer(path / "tokenizer.json" if path.is_dir() else path)


def get_tokenizer(corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE,
                  cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer trained on `corpus`'s train split: loaded from the cache, or trained and cached."""
    directory = tokenizer_dir(corpus, vocab_size, cache_dir)
    path = directory / "tokenizer.json"
    if path.is_file():
        return Tokenizer(path)
    t0 = time.perf_counter()
    tok = train_bpe(corpus.train_sample(BPE_TRAIN_MAX_CHARS), vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    info = {"recipe": _RECIPE, "corpus": corpus.name, "corpus_hash": corpus.hash, "requested_vocab_size": vocab_size,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True), "eos_token": EOS_TOKEN,
            "train_seconds": round(time.perf_counter() - t0, 2)}
    (directory / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    # Write then rename: a reader never sees a partial file, and concurrent writers produce identical bytes.
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(tok.to_str())
    os.replace(tmp, path)
    return Tokenizer(path)
