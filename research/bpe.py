"""Byte-level BPE: trainer and encoder.

Id layout: 0 = pad, 1 = bos, 2 = eos, 3..258 = the 256 byte values (id = byte + 3), then merged
tokens in the order they were learned (merge k has id 259 + k). Every string is a byte string, so
nothing is ever unknown and decode(encode(text)) == text for any text.

Text is first split into chunks by `PRETOKENIZE`; merges never cross chunk boundaries, and
training works on chunk counts so a repeated word costs once.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
import functools
import heapq
import json
from pathlib import Path
import re

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
FIRST_MERGE_ID = BYTE_OFFSET + 256
MIN_VOCAB_SIZE = FIRST_MERGE_ID  # Specials and bytes only, no merges.

# Words with an optional leading space, digit runs, punctuation runs (`_` included), whitespace.
# A whitespace run leaves its last space to the word after it. Every character is a letter, digit,
# `_`, other non-space or space, so the chunks tile the text exactly.
PRETOKENIZE = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")

# Distinct chunks remembered by the encoder; text repeats words a lot.
_CHUNK_CACHE_SIZE = 1 << 16

Pair = tuple[int, int]


def _merge(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replaces non-overlapping occurrences of `pair`, left to right."""
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(text_or_counts: str | Mapping[str, int], num_merges: int) -> list[Pair]:
    """Learns up to `num_merges` merges (fewer if no pair is left), in order.

    Each step merges the most frequent adjacent pair; ties go to the smallest (left_id, right_id)
    pair, so training is deterministic. A `str` is split with `PRETOKENIZE`; a mapping is taken
    as chunk -> count as is.

    Pair counts are kept up to date incrementally: a merge only revisits the chunks that hold the
    merged pair. The best pair comes from a max-heap with lazy invalidation: a count that grows is
    pushed again; one that shrinks leaves a stale (too high) entry, re-queued when popped.
    """
    if isinstance(text_or_counts, str):
        text_or_counts = Counter(PRETOKENIZE.findall(text_or_counts))
    words, freqs = [], []
    for chunk, count in text_or_counts.items():
        ids = [b + BYTE_OFFSET for b in chunk.encode("utf-8")]
        if len(ids) > 1 and count > 0:  # Anything else holds no pairs.
            words.append(ids)
            freqs.append(count)

    pair_counts: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = {}  # Pair -> indices of words holding it.
    for i, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while heap and len(merges) < num_merges:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:
            if count:
                heapq.heappush(heap, (-count, pair))
            continue
        new_id = FIRST_MERGE_ID + len(merges)
        merges.append(pair)
        for i in list(where[pair]):
            old, new = words[i], _merge(words[i], pair, new_id)
            words[i] = new
            old_pairs = Counter(zip(old, old[1:]))
            new_pairs = Counter(zip(new, new[1:]))
            for p in old_pairs.keys() | new_pairs.keys():
                delta = (new_pairs[p] - old_pairs[p]) * freqs[i]
                if not delta:
                    continue
                count = pair_counts[p] + delta
                if not count:
                    del pair_counts[p], where[p]
                    continue
                pair_counts[p] = count
                if delta > 0:
                    heapq.heappush(heap, (-count, p))
                    where.setdefault(p, set()).add(i)
                elif not new_pairs[p]:
                    where[p].discard(i)
    return merges


class BpeTokenizer:
    """Byte-level BPE tokenizer; see the module docstring for the id layout."""

    kind = "bpe"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    # Training text has no bos (research/data.py packs documents separated by eos alone), so neither
    # does a prompt unless asked for (research/tokenizer.py).
    add_bos_default = False

    def __init__(self, merges: Sequence[Pair], vocab_size: int):
        """`vocab_size` may exceed the learned ids; extra ids are never produced."""
        if vocab_size < FIRST_MERGE_ID + len(merges):
            raise ValueError(f"vocab_size={vocab_size}: expected >= {FIRST_MERGE_ID + len(merges)}")
        self.merges = [(a, b) for a, b in merges]
        self.vocab_size = vocab_size
        # Later merges get larger ids, so the smallest id is the highest priority.
        self._merge_ids = {p: FIRST_MERGE_ID + k for k, p in enumerate(self.merges)}
        self._id_bytes = [b""] * BYTE_OFFSET + [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self._id_bytes.append(self._id_bytes[a] + self._id_bytes[b])
        self._encode_chunk = functools.lru_cache(_CHUNK_CACHE_SIZE)(self._encode_chunk_uncached)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BpeTokenizer":
        return cls(train_bpe(text, vocab_size - FIRST_MERGE_ID), vocab_size)

    def _encode_chunk_uncached(self, chunk: str) -> tuple[int, ...]:
        ids = [b + BYTE_OFFSET for b in chunk.encode("utf-8")]
        no_merge = self.vocab_size  # Above every merge id.
        rank = lambda p: self._merge_ids.get(p, no_merge)
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=rank)
            if pair not in self._merge_ids:
                break
            ids = _merge(ids, pair, self._merge_ids[pair])
        return tuple(ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of `text`, with bos first when `add_bos` (None: `add_bos_default`, no bos)."""
        ids = [BOS_ID] if (self.add_bos_default if add_bos is None else add_bos) else []
        for chunk in PRETOKENIZE.findall(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        return [self.encode(text, add_bos) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Drops specials; invalid UTF-8 (e.g. a cut sequence) becomes U+FFFD."""
        data = b"".join(self._id_bytes[i] for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id appends to a text (research/tokenizer.py): a byte, or a merge's two halves
        joined, exactly what `decode` concatenates. pad/bos/eos (which decode drops) and the ids past
        the learned merges up to `vocab_size` are None."""
        learned = self._id_bytes[BYTE_OFFSET:]
        return [None] * BYTE_OFFSET + learned + [None] * (self.vocab_size - len(self._id_bytes))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "specials": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID},
            "merges": self.merges,
        }
        # research.tokenizer.load_tokenizer dispatches on this file's "kind".
        (directory / "tokenizer.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "BpeTokenizer":
        meta = json.loads((Path(directory) / "tokenizer.json").read_text())
        return cls(meta["merges"], meta["vocab_size"])
