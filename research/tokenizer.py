"""The tokenizer interface, a factory that trains one of `KINDS`, and an on-disk cache.

Every tokenizer maps any string to ids and back exactly (byte-level or byte fallback), reserves
ids 0, 1, 2 for pad, bos, eos, and saves itself to a directory whose `tokenizer.json` names its
kind, so `load_tokenizer` can dispatch on it.

`encode(text)` encodes a text the way the tokenizer's model saw text in training, like transformers'
`add_special_tokens=True`: a Hugging Face tokenizer that starts texts with bos (Llama, Mistral) adds it,
and ours add nothing, because the training pipeline packs documents separated by eos alone
(research/data.py `pack_documents`, fed by `encode_batch` with the default). `add_bos=True` or `False`
overrides that.
"""

from collections.abc import Sequence
import hashlib
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Protocol

from models.config import ConfigError
from research import bpe
from research.data import DataError
from research import hf_tokenizer
from research import sentencepiece_tokenizer

KINDS = ("bpe", "sentencepiece-bpe", "sentencepiece-unigram")
METADATA_FILE = "tokenizer.json"
# Part of the cache key: bump it when training or the saved format changes.
FORMAT_VERSION = 1


class Tokenizer(Protocol):
    kind: str
    vocab_size: int  # All ids, specials included, are below this.
    pad_id: int
    bos_id: int
    eos_id: int
    add_bos_default: bool  # what encode does when add_bos is None: did the model see bos before its text?

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`, never with eos; with bos first when `add_bos` (None: `add_bos_default`)."""

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, dropping pad/bos/eos."""

    def token_bytes(self) -> list[bytes | None]:
        """For every id in range(vocab_size): the exact bytes the token appends to generated text when it
        follows other generated tokens, or None for a token that must never be generated inside a constrained
        output (bos, eos, pad, unk, control/special/added-special tokens, and ids past the real vocabulary
        when vocab_size pads it).

        A token may hold part of a UTF-8 character (byte-level BPE, byte fallback), so this is bytes, not
        text. Where decode drops a space at the very start of a text (SentencePiece's dummy prefix, a
        Hugging Face Strip or Metaspace decoder), the first token's bytes keep it: they describe the token
        in the middle of a text."""

    def save(self, directory: Path) -> None:
        """Writes the tokenizer and its `tokenizer.json` so `load_tokenizer(directory)` works."""


def _check_config(kind: str, vocab_size: int) -> None:
    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer={kind!r}: expected one of {', '.join(KINDS)}")
    minimum = bpe.MIN_VOCAB_SIZE if kind == "bpe" else sentencepiece_tokenizer.MIN_VOCAB_SIZE
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ConfigError(
            f"model.vocab_size={vocab_size!r}: expected an integer >= {minimum} for "
            f"data.tokenizer={kind!r}")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer written by `save`, or a Hugging Face tokenizer folder (research/hf_tokenizer.py)."""
    if hf_tokenizer.is_hf_tokenizer(directory):
        return hf_tokenizer.HFTokenizer.load(directory)
    if not (Path(directory) / METADATA_FILE).is_file():
        raise DataError(f"{directory}: no {METADATA_FILE} or tokenizer.model (expected a saved tokenizer)")
    kind = json.loads((Path(directory) / METADATA_FILE).read_text())["kind"]
    if kind == "bpe":
        return bpe.BpeTokenizer.load(directory)
    if kind in KINDS:
        return sentencepiece_tokenizer.SentencePieceTokenizer.load(directory)
    raise DataError(f"{directory}: unknown tokenizer kind {kind!r}")


def _train(kind: str, text: str, vocab_size: int) -> Tokenizer:
    if kind == "bpe":
        return bpe.BpeTokenizer.train(text, vocab_size)
    return sentencepiece_tokenizer.SentencePieceTokenizer.train(kind, text, vocab_size)


def cache_key(kind: str, vocab_size: int, text: str) -> str:
    """sha256 over (kind, vocab_size, sha256(text), FORMAT_VERSION), as hex."""
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = json.dumps([kind, vocab_size, text_hash, FORMAT_VERSION])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def train_tokenizer(kind: str, text: str, vocab_size: int,
                    cache_dir: str | os.PathLike) -> Tokenizer:
    """Trains a `kind` tokenizer on `text`, or loads it from `<cache_dir>/tokenizers/<key>/`.

    Training writes into a temporary sibling directory that is renamed into place, so readers
    never see a partial tokenizer; if another process got there first, its tokenizer is used.
    """
    _check_config(kind, vocab_size)
    final = Path(cache_dir) / "tokenizers" / cache_key(kind, vocab_size, text)[:16]
    if not (final / METADATA_FILE).exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            _train(kind, text, vocab_size).save(tmp)
            try:
                tmp.rename(final)
            except OSError:  # `final` exists and is not empty.
                if not (final / METADATA_FILE).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(final)
