"""From a data config to a tokenizer and packed train/validation datasets (tokenized once, cached)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from research.config import DataConfig
from research.data import PackedDataset, load_text, pack_documents, split_documents, train_val_split
from research.needles import Pieces, RetrievalDataset
from research.tokenizer import Tokenizer, train_tokenizer

Dataset = PackedDataset | RetrievalDataset  # batch(step), eval_batches(n), num_tokens


def _encode_cached(tokenizer: Tokenizer, docs: list[str], cache: Path) -> np.ndarray:
    """The packed token stream of docs, read from / written to an .npy cache file."""
    if cache.exists():
        return np.load(cache)
    stream = pack_documents(tokenizer.encode_batch(docs), tokenizer.eos_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, stream)
    os.replace(tmp, cache)
    return stream


def split_text(cfg: DataConfig) -> tuple[str, list[str], list[str]]:
    """The data's text (cut to `max_bytes`) and its training and validation documents."""
    text = load_text(cfg.source, cfg.cache_dir)
    if cfg.max_bytes:
        text = text.encode("utf-8")[:cfg.max_bytes].decode("utf-8", errors="ignore")
    return (text, *train_val_split(split_documents(text), cfg.val_fraction, cfg.split_seed))


def build_datasets(cfg: DataConfig, vocab_size: int, seed: int) -> tuple[Tokenizer, Dataset, Dataset]:
    """Loads the text, trains (or reuses) the tokenizer on the training split, and packs both splits.

    The validation split is document-level and fixed by `cfg.split_seed`, not by the run's `seed` (which
    orders the training windows), so runs with different seeds are validated on the same documents and
    share one tokenizer; the tokenizer never sees the validation split. With `cfg.task == "retrieval"` the
    datasets are needle-in-haystack episodes whose haystacks come from each split's prose.
    """
    text, train_docs, val_docs = split_text(cfg)
    train_text = "\n\n".join(train_docs)
    tokenizer = train_tokenizer(cfg.tokenizer, train_text, vocab_size, cfg.cache_dir)
    if cfg.task == "retrieval":
        return tokenizer, *(RetrievalDataset(Pieces(tokenizer, docs, train_docs), cfg.seq_len, cfg.batch_size, seed,
                                             cfg.retrieval) for docs in (train_docs, val_docs))

    key = hashlib.sha256(f"{cfg.tokenizer}|{vocab_size}|{cfg.val_fraction}|{cfg.split_seed}|".encode()
                         + text.encode("utf-8")).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / "tokens"
    train_stream = _encode_cached(tokenizer, train_docs, cache / f"{key}-train.npy")
    val_stream = _encode_cached(tokenizer, val_docs, cache / f"{key}-val.npy")
    train = PackedDataset(train_stream, cfg.seq_len, cfg.batch_size, seed)
    val = PackedDataset(val_stream, cfg.seq_len, cfg.batch_size, seed)
    return tokenizer, train, val
