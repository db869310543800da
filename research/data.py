"""Text loading, train/val split and packing into fixed-length batches with a stateless order.

The pipeline is: `load_text` -> `split_documents` -> `train_val_split` -> (tokenize, elsewhere)
-> `pack_documents` -> `PackedDataset`. Token ids come in from outside; this file knows no
tokenizer.

`PackedDataset.batch(step)` is a pure function of (seed, step), so resuming at step s reproduces
an uninterrupted run exactly with no iterator state to checkpoint.

A bad config value (a `data.source` that names nothing, a `data.val_fraction` out of range) is a
`ConfigError` naming the field; data that cannot be trained on (a file that is not UTF-8 text, a corpus
with no text, too few documents or tokens) is a `DataError` naming the file or what is missing. Both are
one-line ValueErrors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import random
import re
from typing import Iterator, Sequence

import numpy as np

from models.config import ConfigError
from research import corpus

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html")


class DataError(ValueError):
    """Training data that cannot be used: one line naming the file, or what the corpus lacks."""


def _read_text(path: pathlib.Path, source: str) -> str:
    """The UTF-8 text of `path`: `source` itself, or a file in that folder (then named after it)."""
    where = f"data.source={source!r}: " + ("" if path == pathlib.Path(source) else f"{path}: ")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}not UTF-8 text (invalid byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start})") from None
    except OSError as err:  # unreadable: permissions, an I/O error, a file removed meanwhile
        raise DataError(f"{where}{err.strerror or err}") from None


def _read_source(source: str) -> str:
    """The text of the file `source`, or of the text files in the folder `source` (see load_text)."""
    path = pathlib.Path(source)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as err:  # a path the OS will not look up: a name too long, a folder it may not enter
        raise DataError(f"data.source={source!r}: {err.strerror or err}") from None
    if source and is_file:  # "" would mean the working directory
        return _read_text(path, source)
    if source and is_dir:
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES]
        files.sort(key=lambda p: p.relative_to(path).as_posix())
        return "\n\n".join(_read_text(p, source) for p in files)
    raise ConfigError(f"data.source={source!r}: not 'embedded', an existing file or a directory of text files")


def load_text(source: str, cache_dir: str | os.PathLike) -> str:
    """Returns the text of `source`: "embedded", a UTF-8 file, or a directory of text files.

    A directory's files with a suffix in TEXT_SUFFIXES are read recursively in order of relative
    path (stable across file systems) and joined with blank lines, so each file starts a document.
    """
    if source == "embedded":
        text = corpus.embedded_corpus_path(cache_dir).read_text(encoding="utf-8")
    else:
        text = _read_source(source)
    if not text.strip():
        raise DataError(f"data.source={source!r}: no text found (allowed suffixes: "
                        f"{' '.join(TEXT_SUFFIXES)})")
    return text


def split_documents(text: str) -> list[str]:
    """Splits on blank lines (which may hold spaces), dropping empty documents."""
    return [doc.strip("\n") for doc in re.split(r"\n[ \t\r]*\n", text) if doc.strip()]


def train_val_split(docs: Sequence[str], val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """Shuffles documents with `random.Random(seed)`; the last ceil(val_fraction * n) are val.

    Splitting whole documents keeps validation text unseen in training. Both sides get at least
    one document.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction={val_fraction!r}: expected 0 < val_fraction < 1")
    if len(docs) < 2:
        raise DataError(f"data: {len(docs)} document(s); a train/val split needs at least 2 "
                        "(documents are separated by blank lines)")
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    num_val = min(max(math.ceil(val_fraction * len(docs)), 1), len(docs) - 1)
    return shuffled[:-num_val], shuffled[-num_val:]


def pack_documents(token_lists: Sequence[Sequence[int] | np.ndarray], eos_id: int) -> np.ndarray:
    """Concatenates documents, each followed by `eos_id`, into one int32 stream [total_tokens]."""
    lengths = [len(tokens) for tokens in token_lists]
    stream = np.full(sum(lengths) + len(lengths), eos_id, dtype=np.int32)
    start = 0
    for tokens, n in zip(token_lists, lengths):
        stream[start:start + n] = tokens
        start += n + 1  # the slot after each document keeps its eos_id
    return stream


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """Window indices in the order epoch `epoch` visits them [num_windows]; read-only."""
    order = np.random.default_rng([seed, epoch]).permutation(num_windows)
    order.flags.writeable = False  # shared through the cache
    return order


@dataclasses.dataclass(frozen=True, eq=False)
class PackedDataset:
    """Non-overlapping windows of a token stream, served in a stateless shuffled order.

    Window i is tokens[i * seq_len : i * seq_len + seq_len + 1]: inputs are window[:-1] and
    targets window[1:], so consecutive windows share one boundary token and every token is a
    target once. The tail that does not fill a window is unused.

    The global order is epochs laid end to end; epoch e visits windows in the order
    `np.random.default_rng([seed, e]).permutation(num_windows)`, and step s takes flat positions
    [s * batch_size, (s + 1) * batch_size), which may straddle two epochs.
    """

    tokens: np.ndarray  # [num_tokens] int32
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"tokens: expected a 1-D integer array, got shape {tokens.shape} "
                            f"dtype {tokens.dtype}")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: expected a non-negative integer")
        object.__setattr__(self, "tokens", tokens.astype(np.int32, copy=False))
        if self.num_windows < self.batch_size:
            need = self.batch_size * self.seq_len + 1
            raise DataError(f"token stream too short: {tokens.size} tokens, but batch_size="
                            f"{self.batch_size} x seq_len={self.seq_len} needs at least {need}")

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def num_windows(self) -> int:
        return max(self.tokens.size - 1, 0) // self.seq_len

    def epoch_of(self, step: int) -> int:
        """The epoch of the first example of `step`."""
        return step * self.batch_size // self.num_windows

    def _windows(self, indices: np.ndarray) -> np.ndarray:
        """Gathers windows [len(indices), seq_len + 1] int32."""
        offsets = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return self.tokens[offsets]

    def batch(self, step: int) -> np.ndarray:
        """The training batch for `step`: [batch_size, seq_len + 1] int32, a pure function of
        (seed, step)."""
        if step < 0:
            raise ValueError(f"step={step}: expected >= 0")
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_windows)
        indices = np.empty_like(positions)
        # batch_size <= num_windows, so at most two epochs are involved.
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            indices[mask] = _epoch_order(self.seed, int(epoch), self.num_windows)[offsets[mask]]
        return self._windows(indices)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[np.ndarray]:
        """Yields [batch_size, seq_len + 1] int32 batches of windows in stream order.

        The same windows every call (no shuffle), so validation losses are comparable across
        steps and runs. A final partial batch is dropped to keep shapes static.
        """
        num_batches = self.num_windows // self.batch_size
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        for b in range(num_batches):
            yield self._windows(np.arange(b * self.batch_size, (b + 1) * self.batch_size))
