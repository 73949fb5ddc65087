"""`prepare_data`: corpus -> tokenizer -> token windows in one call, cached at every step (what `make train` runs)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from dsv3_jax.data.corpus import DEFAULT_VAL_FRACTION, prepare_corpus
from dsv3_jax.data.fetch import resolve_cache_dir
from dsv3_jax.data.build import Progress, finished
from dsv3_jax.data.documents import CorpusError, DataError
from dsv3_jax.data.pipeline import (TokenDataset, base_meta, build_dataset, cache_dir_for, dataset_from_meta,
                                    local_batch_size, resolve_process, windows_dir)
from dsv3_jax.data.pretokenized import build_token_windows, tokens_manifest
from dsv3_jax.data.shards import token_dtype as token_dtype_for
from dsv3_jax.data.tokenizer import (DEFAULT_VOCAB_SIZE, MIN_VOCAB_SIZE, Tokenizer, get_tokenizer,
                                     load_tokenizer, tokenizer_dir)


def prepare_data(corpus_name: str = "shakespeare", vocab_size: int = DEFAULT_VOCAB_SIZE, seq_len: int = 256,
                 mtp_depth: int = 1, cache_dir: str | os.PathLike | None = None, *, batch_size: int | None = None,
                 process_count: int | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                 tokenizer_path: str | os.PathLike | None = None, tokenizer_origin: str = "given",
                 text_field: str = "text", workers: int = 0, progress_bar: bool = False,
                 token_dtype: str = "uint16", verbose: bool = True) -> TokenDataset:
    """Load/download the corpus, train/load its tokenizer, write/load its windows; print one line per step.

    `tokenizer_path` uses that tokenizer file (or directory holding one) instead of the one trained on the
    corpus: the user's own (`data.tokenizer`, any HF tokenizer.json), or a run's own copy, so a resumed or
    evaluated run encodes exactly as it did when it trained (`tokenizer_origin` says which, in the log). A given
    tokenizer is loaded and checked against `vocab_size` before the corpus is read.

    The windows are encoded by `workers` processes (0: one per core), with a progress bar on stderr if
    `progress_bar`; an interrupted encoding resumes where it stopped (`build.py`).

    `tokens:DIR` trains on token shards produced elsewhere (`pretokenized.py`; `token_dtype` for `.bin` and
    `.array_record` shards): it needs `tokenizer_path`, the tokenizer that produced them.

    With `batch_size`, also check that both splits hold a global batch divisible among the processes, so a
    bad setting fails here rather than after the model is built.
    """
    def log(msg: str) -> None:
        if verbose:
            print(f"data: {msg}", file=sys.stderr, flush=True)

    # Cheap argument checks first: nothing is downloaded or trained for a call that cannot succeed.
    given = None
    if tokenizer_path is not None:
        try:
            given = load_tokenizer(tokenizer_path)
        except (OSError, ValueError) as err:
            raise DataError(str(err)) from None
        if given.vocab_size > vocab_size:
            raise DataError(f"the tokenizer {given.path} has {given.vocab_size} ids but model.vocab_size is "
                            f"{vocab_size}: set --set model.vocab_size={given.vocab_size} (or more)")
    elif vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {vocab_size}")
    if seq_len < 1 or mtp_depth < 0:
        raise DataError(f"need seq_len >= 1 and mtp_depth >= 0, got seq_len={seq_len}, mtp_depth={mtp_depth}")
    if batch_size is not None:
        _, process_count = resolve_process(0, process_count)
        local_batch_size(batch_size, process_count)
    cache = resolve_cache_dir(cache_dir)
    if corpus_name.startswith("tokens:"):
        if given is None:
            raise DataError(f"{corpus_name} holds token ids: name the tokenizer that produced them with "
                            "--set data.tokenizer=PATH (generate decodes with it)")
        dataset = _pretokenized(corpus_name[len("tokens:"):], given, vocab_size, seq_len, mtp_depth, cache,
                                token_dtype, val_fraction, log)
        if batch_size is not None:
            dataset.check_batch_size(batch_size, process_count)
        return dataset

    t0 = time.perf_counter()
    corpus = prepare_corpus(corpus_name, cache, val_fraction=val_fraction, text_field=text_field)
    if corpus.streamed:
        log(f"corpus {corpus_name}: files listed, identity {corpus.hash[:12]} ({time.perf_counter() - t0:.1f} s)")
    else:
        log(f"corpus {corpus_name}: {len(corpus.documents):,} documents, {corpus.n_bytes / 1e6:.2f} MB, "
            f"hash {corpus.hash[:12]} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    if given is not None:
        tokenizer, origin = given, tokenizer_origin
    else:
        cached = (tokenizer_dir(corpus, vocab_size, cache) / "tokenizer.json").is_file()
        tokenizer, origin = get_tokenizer(corpus, vocab_size, cache), "byte-level BPE, " + (
            "cached" if cached else "trained")
    log(f"tokenizer: {tokenizer.vocab_size} ids, end of text {tokenizer.eos_token!r} = id {tokenizer.eos_id}, "
        f"{origin} ({time.perf_counter() - t0:.1f} s) {tokenizer.path}")

    t0 = time.perf_counter()
    window = seq_len + 1 + mtp_depth
    bar = None
    if progress_bar and finished(cache_dir_for(corpus, tokenizer, window, cache)) is None:
        bar = _ProgressBar(corpus_name)
    try:
        dataset = build_dataset(corpus, tokenizer, seq_len, mtp_depth, cache, vocab_size=vocab_size,
                                workers=workers, progress=bar.update if bar else None, log=log)
    finally:
        if bar is not None:
            bar.close()
    log(f"{dataset.summary()} ({time.perf_counter() - t0:.1f} s) {dataset.directory}")
    if batch_size is not None:
        dataset.check_batch_size(batch_size, process_count)
    return dataset


def _pretokenized(source: str, tokenizer: Tokenizer, vocab_size: int, seq_len: int, mtp_depth: int, cache: Path,
                  token_dtype: str, val_fraction: float, log: Callable[[str], None]) -> TokenDataset:
    t0 = time.perf_counter()
    try:
        identity = tokens_manifest(source, token_dtype)
    except CorpusError as err:
        raise DataError(str(err)) from None
    window = seq_len + 1 + mtp_depth
    name = f"tokens:{source}"
    directory = windows_dir(name, identity, tokenizer, window, cache)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else build_token_windows(
        source, window, token_dtype_for(tokenizer.vocab_size), vocab_size, tokenizer.eos_id, directory,
        base_meta(name, identity, tokenizer), token_dtype=token_dtype, val_fraction=val_fraction)
    dataset = dataset_from_meta(directory, meta, tokenizer, vocab_size, seq_len, mtp_depth)
    log(f"{dataset.summary()} ({time.perf_counter() - t0:.1f} s) {dataset.directory}")
    return dataset


class _ProgressBar:
    """tqdm over the corpus bytes encoded, with documents/s and tokens beside it."""

    def __init__(self, name: str):
        from tqdm import tqdm

        self._bar = tqdm(desc=f"preparing {name}", unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                         dynamic_ncols=True)

    def update(self, p: Progress) -> None:
        self._bar.update(p.bytes - self._bar.n)
        self._bar.set_postfix_str(f"{p.documents / max(p.seconds, 1e-9):,.0f} docs/s, {p.tokens:,} tokens",
                                  refresh=False)

    def close(self) -> None:
        self._bar.close()
