"""Data side of training: corpora, tokenizer, token windows in ArrayRecord, grain iterators.

    from dsv3_jax.data import prepare_data
    data = prepare_data("shakespeare", vocab_size=8192, seq_len=256, mtp_depth=1)  # cached after the first run
    it = data.train_iterator(batch_size=16, seed=0)   # [16 // process_count, 258] int32 batches, forever
    batch = next(it); state = it.get_state()           # JSON-able; it.set_state(state) on a fresh one resumes
    for batch in data.val_batches(16): ...             # validation once, in order
    it.close()

Modules: `sources` (named text sources), `fetch` (pinned pip packages), `corpus` (hash + split), `tokenizer`
(byte-level BPE), `shards` (windows on disk), `pipeline` (dataset + iterators), `prepare` (all of it).
"""

from dsv3_jax.data.corpus import Corpus, prepare_corpus
from dsv3_jax.data.fetch import DEFAULT_CACHE_DIR, DownloadError
from dsv3_jax.data.pipeline import (DataError, SplitInfo, TokenDataset, TrainIterator, build_dataset,
                                    train_iterator, val_batches)
from dsv3_jax.data.prepare import prepare_data
from dsv3_jax.data.sources import CorpusError, Document
from dsv3_jax.data.tokenizer import EOS_TOKEN, Tokenizer, get_tokenizer, load_tokenizer

__all__ = ["DEFAULT_CACHE_DIR", "EOS_TOKEN", "Corpus", "CorpusError", "DataError", "Document", "DownloadError",
           "SplitInfo", "TokenDataset", "Tokenizer", "TrainIterator", "build_dataset", "get_tokenizer",
           "load_tokenizer", "prepare_corpus", "prepare_data", "train_iterator", "val_batches"]
