"""Needles in haystacks: the synthetic retrieval task of the context-rot study, built token-exact.

An episode is haystack text from the corpus with facts inserted ("The code of harbour is lemon."), then a
question about one key (" The code of harbour is"); the answer is the value's id (" lemon"). Every
piece is tokenized on its own and the pieces are concatenated, so the answer's id is exactly the one in the
needle, and a needle lands exactly at the sentence boundary its depth asks for.

Keys and values are words that the tokenizer spells as one token (with the space before them) and that
are rare in the training text, split into two disjoint sets by a hash of the word; they are drawn so that
neither occurs in the episode's haystack, so the only copies of a key or value are the facts placed on
purpose, and an answer is one token.
Distractors are facts placed on purpose too:

  near_miss  the key spelled most like the asked one (fewest edits), with another value (anywhere)
  stale      the asked key with another value, earlier than the needle: the later statement wins

Needles are worded like the question (`same`) or paraphrased (`paraphrase`: no words in common with
the question but the key), as in Chroma's needle-question similarity. A haystack is consecutive corpus
sentences (`coherent`) or the same sentences in random order (`shuffled`).

`RetrievalDataset` serves training rows of packed episodes in the `PackedDataset` interface; targets that
are context only are stored as their bitwise complement `~id` (negative), which the loss does not score.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Iterator, Sequence

import numpy as np

from research.config import RetrievalConfig
from research.data import DataError

WORD = re.compile(r" [a-z]{4,}")  # a key or value: a one-token lowercase word of 4+ letters, space included
MIN_WORDS = 32  # keys and values each: lost in the middle with k = 30 needs 30 of both
COMMON = 0.01  # share of sentences a key or value word may occur in
TEMPLATES = {"same": (" The code of", " is"), "paraphrase": (" Note that", " pairs with")}
QUESTION = TEMPLATES["same"]  # the question is the same-worded fact cut before its value
RESERVED = {w for pair in TEMPLATES.values() for part in pair for w in part.lower().split()}  # never a key or value
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def prose(documents: Sequence[str]) -> list[str]:
    """The sentences of the documents that are paragraphs of prose (no line breaks, several sentences)."""
    return [s for doc in documents if "\n" not in doc and ". " in doc for s in SENTENCE_END.split(doc.strip()) if s]


class Pieces:
    """A tokenizer's ids for the fixed pieces of the task, and its sentence pool (the haystack source).

    sentences: prose from `documents` (paragraphs), each tokenized with a leading space; the keys and values
    are chosen with word counts from `word_documents` (default: `documents`), which evaluation sets to the
    training split so that both draw from the same sets.
    """

    def __init__(self, tokenizer, documents: Sequence[str], word_documents: Sequence[str] | None = None,
                 max_sentences: int = 60_000):
        self.tokenizer = tokenizer
        texts = prose(documents)[:max_sentences]
        if len(texts) < 20:
            raise DataError(f"data: {len(texts)} prose sentences for haystacks; the retrieval task needs at "
                            "least 20 (paragraphs of several sentences, no line breaks)")
        self.texts = [t.lower() for t in texts]
        self.tokens = [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch([" " + t for t in texts],
                                                                                   add_bos=False)]
        self.lengths = np.array([len(t) for t in self.tokens])
        self._cache: dict[str, np.ndarray] = {}
        self.keys, self.values = self._words(tokenizer, prose(word_documents) if word_documents is not None else texts)

    @staticmethod
    def _words(tokenizer, sentences: Sequence[str]) -> tuple[list[str], list[str]]:
        """Keys and values: the tokenizer's one-token words (ids that round-trip) found in at most COMMON of
        `sentences` (common words made poor keys: haystacks are full of them), split in two by a hash of the
        word. Training and evaluation must pass the same sentences (the training split's) to get the same sets."""
        counts: dict[str, int] = {}
        for text in sentences:
            for word in set(re.findall(r"[a-z]+", text.lower())):
                counts[word] = counts.get(word, 0) + 1
        words = []
        for i, raw in enumerate(tokenizer.token_bytes()):
            text = raw.decode("utf-8", errors="replace") if raw else ""
            if (WORD.fullmatch(text) and text[1:] not in RESERVED and counts.get(text[1:], 0) <= COMMON * len(sentences)
                    and list(tokenizer.encode(text, add_bos=False)) == [i]):
                words.append(text[1:])
        keys = sorted(w for w in words if zlib.crc32(w.encode()) % 2 == 0)
        values = sorted(w for w in words if zlib.crc32(w.encode()) % 2 == 1)
        if min(len(keys), len(values)) < MIN_WORDS:
            raise DataError(f"the tokenizer has {len(keys)} key and {len(values)} value words (one-token lowercase "
                            f"words of 4+ letters, rare in the text); the retrieval task needs {MIN_WORDS} of each "
                            "(a larger vocabulary)")
        return keys, values

    def ids(self, text: str) -> np.ndarray:
        if text not in self._cache:
            self._cache[text] = np.asarray(self.tokenizer.encode(text, add_bos=False), np.int32)
        return self._cache[text]

    def fact(self, key: str, value: str, template: str = "same") -> np.ndarray:
        head, middle = TEMPLATES[template]
        return np.concatenate([self.ids(head), self.ids(" " + key), self.ids(middle), self.ids(" " + value),
                               self.ids(".")])

    def question(self, key: str) -> np.ndarray:
        return np.concatenate([self.ids(QUESTION[0]), self.ids(" " + key), self.ids(QUESTION[1])])

    def answered(self, key: str, value: str) -> tuple[np.ndarray, np.ndarray]:
        """A question, its answer and a period, with which of its ids are scored (the answer's)."""
        q, a, end = self.question(key), self.answer(value), self.ids(".")
        return np.concatenate([q, a, end]), np.concatenate([np.zeros(len(q), bool), np.ones(len(a), bool),
                                                             np.zeros(len(end), bool)])

    def answer(self, value: str) -> np.ndarray:
        return self.ids(" " + value)

    def haystack(self, rng: np.random.Generator, num_tokens: int, shuffled: bool = False) -> Haystack:
        """num_tokens of consecutive sentences from a random start (the last one cut), or those sentences
        in random order."""
        start = int(rng.integers(len(self.tokens)))
        chosen, total = [], 0
        while total < num_tokens:
            chosen.append((start + len(chosen)) % len(self.tokens))
            total += self.lengths[chosen[-1]]
        if shuffled:
            rng.shuffle(chosen)
        ids = np.concatenate([self.tokens[i] for i in chosen] or [np.zeros(0, np.int32)])
        words = frozenset(w for i in chosen for w in re.findall(r"[a-z]+", self.texts[i]))
        return Haystack(ids, words, np.cumsum([0] + [self.lengths[i] for i in chosen])).cut(num_tokens)


@dataclasses.dataclass(frozen=True)
class Haystack:
    ids: np.ndarray  # [H]
    words: frozenset[str]  # the words of its sentences, lower case, whole: keys and values avoid them
    starts: np.ndarray  # token index of every sentence start, and H: where a fact may go

    def cut(self, num_tokens: int) -> Haystack:
        keep = self.starts[self.starts < num_tokens]
        return Haystack(self.ids[:num_tokens], self.words, np.append(keep, min(num_tokens, len(self.ids))))

    def boundary(self, position: float) -> int:
        """The sentence boundary nearest to token index position * H (the first of two equally near)."""
        return int(self.starts[np.argmin(np.abs(self.starts - position * len(self.ids)))])


def edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


class Draw:
    """Keys and values for one episode: never in its haystack, never twice."""

    def __init__(self, pieces: Pieces, rng: np.random.Generator, hay: Haystack):
        self.pieces, self.rng, self.taken = pieces, rng, set(hay.words)

    def _pick(self, options: Sequence[str]) -> str:
        free = [w for w in options if w not in self.taken]
        if not free:
            raise DataError("every key or value word occurs in the haystack or the episode already")
        word = free[int(self.rng.integers(len(free)))]
        self.taken.add(word)
        return word

    def key(self) -> str:
        return self._pick(self.pieces.keys)

    def value(self) -> str:
        return self._pick(self.pieces.values)

    def near_miss(self, key: str) -> str:
        """The free key with the fewest edits from `key` (ties: drawn)."""
        free = [w for w in self.pieces.keys if w not in self.taken]
        if not free:
            raise DataError("every key word occurs in the haystack or the episode already")
        distance = np.array([edits(key, w) for w in free])
        return self._pick([w for w, d in zip(free, distance) if d == distance.min()])


@dataclasses.dataclass(frozen=True)
class Fact:
    key: str
    value: str
    position: float  # fraction of the haystack before it, 0..1
    kind: str = "needle"  # needle | near_miss | stale | other
    template: str = "same"


@dataclasses.dataclass(frozen=True)
class Episode:
    tokens: np.ndarray  # [length] the prompt: haystack with facts, then the question
    answer: np.ndarray  # [m] the value's ids
    key: str
    value: str
    spans: tuple[tuple[int, int, Fact], ...]  # (start, end, fact) of every inserted fact, in text order
    haystack_tokens: int

    @property
    def needle(self) -> tuple[int, int]:
        return next((s, e) for s, e, f in self.spans if f.kind == "needle")


def place(pieces: Pieces, hay: Haystack, facts: Sequence[Fact]) -> tuple[np.ndarray, tuple[tuple[int, int, Fact], ...]]:
    """The haystack with each fact inserted at the sentence boundary nearest to its position (a fraction of
    the haystack's tokens); facts at one boundary keep their given order.
    -> (ids, (start, end, fact) for every fact in text order)."""
    order = sorted(range(len(facts)), key=lambda i: facts[i].position)  # stable
    parts, spans, cursor, start = [], [], 0, 0
    for i in order:
        ids = pieces.fact(facts[i].key, facts[i].value, facts[i].template)
        cut = hay.boundary(facts[i].position)
        parts += [hay.ids[cursor:cut], ids]
        start += cut - cursor
        spans.append((start, start + len(ids), facts[i]))
        start += len(ids)
        cursor = cut
    return np.concatenate([*parts, hay.ids[cursor:]]), tuple(spans)


def facts_length(pieces: Pieces, facts: Sequence[Fact]) -> int:
    return sum(len(pieces.fact(f.key, f.value, f.template)) for f in facts)


def fact_tokens(pieces: Pieces, template: str) -> int:
    """Every fact of a template has this many ids: keys and values are one id each."""
    head, middle = TEMPLATES[template]
    return len(pieces.ids(head)) + len(pieces.ids(middle)) + len(pieces.ids(".")) + 2


def min_length(pieces: Pieces, facts: int, template: str = "same") -> int:
    """The shortest episode with `facts` facts and a question: no haystack at all."""
    return len(pieces.ids(QUESTION[0])) + len(pieces.ids(QUESTION[1])) + 1 + facts * fact_tokens(pieces, template)


def episode(pieces: Pieces, rng: np.random.Generator, length: int, depth: float | None = None,
            distractors: int = 0, template: str = "same", shuffled: bool = False, others: int = 0,
            gold_index: int | None = None) -> Episode:
    """One question about one needle, at `depth` (None: uniform), with `distractors` near-miss (even i) and
    stale (odd i) facts; or, with `others` > 0, lost in the middle: the needle is item `gold_index` of
    `others` + 1 facts about different keys spread evenly through the haystack."""
    room = length - min_length(pieces, 1 + distractors + others, template)
    if room < 0:
        raise DataError(f"length={length}: the facts and the question alone take {length - room} tokens")
    hay = pieces.haystack(rng, room, shuffled)  # drawn first: keys and values avoid its words
    draw = Draw(pieces, rng, hay)
    key, value = draw.key(), draw.value()
    if others:
        n = others + 1
        gold = int(rng.integers(n)) if gold_index is None else gold_index
        facts = [Fact(key, value, i / (n - 1), "needle", template) if i == gold else
                 Fact(draw.key(), draw.value(), i / (n - 1), "other", template) for i in range(n)]
    else:
        depth = float(rng.random()) if depth is None else depth
        facts = [Fact(key, value, depth, "needle", template)]
        for i in range(distractors):
            if i % 2 == 0:
                facts.append(Fact(draw.near_miss(key), draw.value(), float(rng.random()), "near_miss", template))
            else:  # listed first, so at the needle's own boundary it still comes before the needle
                facts.insert(0, Fact(key, draw.value(), float(rng.random()) * depth, "stale", template))
    body, spans = place(pieces, hay, facts)
    return Episode(np.concatenate([body, pieces.question(key)]), pieces.answer(value), key, value, spans, room)


def training_episode(pieces: Pieces, rng: np.random.Generator, length: int,
                     mix: RetrievalConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids [length], scored [length] bool): 1..max_facts facts (and maybe distractors) in a haystack, then a
    question about each fact in random order, each followed by its answer, whose ids alone are scored."""
    qa_tokens = min_length(pieces, 0) + 1 + len(pieces.ids("."))  # a question, its one-id answer, a period
    widest = max(fact_tokens(pieces, t) for t in TEMPLATES)
    num_distractors = int(rng.integers(1, 3)) if rng.random() < mix.distractor_rate else 0
    fits = (length - num_distractors * widest) // (widest + qa_tokens)  # facts that fit with their questions
    if fits < 1:  # too short: plain context, nothing scored
        return pieces.haystack(rng, length).ids, np.zeros(length, bool)
    most = min(mix.max_facts, fits)
    num_facts = int(rng.integers((most + 1) // 2, most + 1))  # dense: more answers per token speed learning up
    templates = ["paraphrase" if rng.random() < mix.paraphrase_rate else "same" for _ in range(num_facts)]
    room = (length - sum(fact_tokens(pieces, t) for t in templates) - num_facts * qa_tokens
            - num_distractors * widest)
    hay = pieces.haystack(rng, room)
    draw = Draw(pieces, rng, hay)
    needles = [Fact(draw.key(), draw.value(), float(rng.random()), "needle", t) for t in templates]
    stale, near = [], []
    for i in range(num_distractors):
        target = needles[int(rng.integers(num_facts))]
        if i % 2 == 0:
            near.append(dataclasses.replace(target, key=draw.near_miss(target.key), value=draw.value(),
                                            position=float(rng.random()), kind="near_miss"))
        else:
            stale.append(dataclasses.replace(target, value=draw.value(), position=float(rng.random()) * target.position,
                                             kind="stale"))
    body, _ = place(pieces, hay, stale + needles + near)  # stale first: at an equal boundary it comes first
    qa = [pieces.answered(needles[i].key, needles[i].value) for i in rng.permutation(num_facts)]
    ids = np.concatenate([body, *(ids for ids, _ in qa)])
    scored = np.concatenate([np.zeros(len(body), bool), *(scored for _, scored in qa)])
    pad = length - len(ids)  # distractors took less than their bound: plain haystack fills the end
    return (np.concatenate([ids, pieces.haystack(rng, pad).ids]) if pad else ids,
            np.concatenate([scored, np.zeros(pad, bool)]))


def context_only(ids: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """ids with the targets that are not scored stored as ~id (negative): what the loss reads."""
    return np.where(scored, ids, ~ids).astype(np.int32)


class RetrievalDataset:
    """Rows of packed training episodes, in the `PackedDataset` interface: `batch(step)` is a pure function
    of (seed, step); `eval_batches` serves the same rows every call.

    A row [seq_len + 1] holds episodes of random lengths in [min_length, seq_len + 1], back to back (no
    separator: a later episode's keys differ, so earlier ones are just more context); the last one takes
    what is left, or, when less than min_length is left, the rest is plain unscored haystack. Only the
    answers' ids are scored. The first target is never scored: it belongs to no question.
    """

    def __init__(self, pieces: Pieces, seq_len: int, batch_size: int, seed: int, mix: RetrievalConfig):
        self.pieces, self.seq_len, self.batch_size, self.seed, self.mix = pieces, seq_len, batch_size, seed, mix
        self.num_tokens = int(pieces.lengths.sum())

    def row(self, rng: np.random.Generator) -> np.ndarray:
        n, lo = self.seq_len + 1, self.mix.min_length
        ids, scored = [], []
        while n > 0:
            length = n if n < 2 * lo else int(rng.integers(lo, n + 1))
            if n - length < lo:
                length = n
            if length < lo:
                part, mask = self.pieces.haystack(rng, length).ids, np.zeros(length, bool)
            else:
                part, mask = training_episode(self.pieces, rng, length, self.mix)
            ids.append(part)
            scored.append(mask)
            n -= length
        return context_only(np.concatenate(ids), np.concatenate(scored))

    def batch(self, step: int) -> np.ndarray:
        """[batch_size, seq_len + 1] int32."""
        rng = np.random.default_rng([self.seed, step])
        return np.stack([self.row(rng) for _ in range(self.batch_size)])

    def eval_batches(self, max_batches: int | None = None) -> Iterator[np.ndarray]:
        for b in range(max_batches or 1):
            rng = np.random.default_rng([2 ** 31 - 1, b])  # not a function of the run's seed: runs compare
            yield np.stack([self.row(rng) for _ in range(self.batch_size)])
