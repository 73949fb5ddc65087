"""Data side of training: corpora, tokenizer, token windows in ArrayRecord, grain iterators.

    from dsv3_jax.data import prepare_data
    data = prepare_data("shakespeare", vocab_size=8192, seq_len=256, mtp_depth=1)  # cached after the first run
    it = data.train_iterator(batch_size=16, seed=0)   # [16 // process_count, 258] int32 batches, forever
    batch = next(it); state = it.get_state()           # JSON-able; it.set_state(state) on a fresh one resumes
    for batch in data.val_batches(16): ...             # validation once, in order
    it.close()

Modules: `sources` and `readers` (named text sources, the user's files), `fetch` (pinned pip packages),
`corpus` (identity + split), `tokenizer` (byte-level BPE or a given tokenizer.json), `shards` (windows on disk),
`build` (parallel, resumable encoding), `pipeline` (dataset + iterators), `prepare` (all of it).
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so a preparation worker process importing one data module does not pay for
# grain and JAX.
_EXPORTS = {
    "Corpus": "corpus", "prepare_corpus": "corpus",
    "DEFAULT_CACHE_DIR": "fetch", "DownloadError": "fetch",
    "SplitInfo": "pipeline", "TokenDataset": "pipeline", "TrainIterator": "pipeline", "build_dataset": "pipeline",
    "train_iterator": "pipeline", "val_batches": "pipeline",
    "CorpusError": "documents", "DataError": "documents", "Document": "documents",
    "prepare_data": "prepare",
    "EOS_TOKEN": "tokenizer", "Tokenizer": "tokenizer", "get_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
