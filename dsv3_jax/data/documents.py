"""A document (stable key + text), the data errors (`CorpusError` for unusable input, `DataError` for data that
cannot serve the requested batches) and the one UTF-8 decoding rule."""

from __future__ import annotations

import dataclasses


class CorpusError(ValueError):
    """A corpus name, file or record is unusable."""


class DataError(ValueError):
    """The data cannot serve the requested batches (too little data, bad batch/process settings, bad state)."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `key` names it stably (it decides the split), `text` is its content."""

    key: str
    text: str


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of `data` with Windows line endings normalised; a CorpusError naming `where` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{where} is not valid UTF-8 ({err})") from None
    # Windows line endings would otherwise double the newline tokens of files edited on Windows.
    return text.replace("\r\n", "\n")
