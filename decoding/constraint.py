"""Constrained decoding: a regular expression compiled into a token automaton that runs inside the loop.

On the host, once per (pattern, vocabulary), `compile_regex`:
  1. outlines-core builds the pattern's byte-level DFA and walks every token's bytes through it (the bytes
     come from the tokenizer's `token_bytes()`: a token may hold part of a UTF-8 character);
  2. states are relabelled 0..S-1 (0 initial) after pruning those from which no accepting state can be
     reached, so a row can never walk into a dead end;
  3. tokens that go to the same next state from every state share a token class (class 0: never allowed:
     special tokens, stop tokens, ids the vocabulary does not cover);
  4. the tables are `next_state [S, C]` int32 (-1: the token class is not allowed there),
     `token_class [V]` int32 and `accepting [S]` bool.
On the device, `Constrained` is a logits processor (decoding/processors.py) whose state is the automaton
state per row: process = one gather and one mask (a stop token only in an accepting state), update = one
gather. Nothing goes back to the host, so it works the same in sampling, num_samples > 1 and beam search
(the states are reordered with the beams). Several automata stack into one processor (tables padded to
the largest), so different rows of a batch can carry different constraints.

A row that reaches max_new_tokens outside an accepting state is incomplete: `Constrained.accepts` walks
the output tokens through the tables and the loops report it in `DecodeOutput.complete`.
`Automaton.check` is the same walk on the host, for tests and for validating outputs.

Compiled automata are cached on disk (`cache_dir`), keyed by the pattern and the vocabulary's hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import outlines_core

from decoding.steps import is_stop, stop_array

CACHE_VERSION = 1  # part of the cache key: bump when the tables' meaning changes


class ConstraintError(ValueError):
    """A pattern that is invalid, that the vocabulary cannot realise, or whose tables exceed the budget."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """The most a compiled constraint may hold on the device; larger ones are refused, not truncated."""

    max_states: int = 100_000
    max_bytes: int = 64 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class Automaton:
    """A pattern's token automaton as host tables (see the module docstring)."""

    pattern: str
    next_state: np.ndarray  # [S, C] int32: -1 where the class is not allowed
    token_class: np.ndarray  # [V] int32
    accepting: np.ndarray  # [S] bool
    compile_seconds: float = 0.0
    cached: bool = False

    @property
    def num_states(self) -> int:
        return self.next_state.shape[0]

    @property
    def num_classes(self) -> int:
        return self.next_state.shape[1]

    @property
    def nbytes(self) -> int:
        return self.next_state.nbytes + self.token_class.nbytes + self.accepting.nbytes

    def describe(self) -> str:
        how = "read from the cache" if self.cached else f"compiled in {self.compile_seconds:.2f} s"
        return (f"constraint: {self.num_states} states, {self.num_classes} token classes, "
                f"{self.nbytes / 1024:.1f} KiB of tables, {how}")

    def check(self, tokens: Sequence[int], stop_tokens: Sequence[int] = ()) -> str:
        """"complete" (a full match: ends in a stop token or an accepting state), "prefix" (may still become
        one) or "invalid", for generated `tokens`; anything after the first stop token is ignored."""
        state = 0
        for token in tokens:
            if token in stop_tokens:
                return "complete" if self.accepting[state] else "invalid"
            if not 0 <= token < len(self.token_class):
                return "invalid"
            state = int(self.next_state[state, self.token_class[token]])
            if state < 0:
                return "invalid"
        return "complete" if self.accepting[state] else "prefix"


def vocabulary_hash(token_bytes: Sequence[bytes | None], eos_id: int | None) -> str:
    digest = hashlib.sha256(repr(eos_id).encode())
    for piece in token_bytes:
        digest.update(b"\x00" if piece is None else b"\x01" + len(piece).to_bytes(4, "little") + piece)
    return digest.hexdigest()[:16]


def compile_regex(pattern: str, token_bytes: Sequence[bytes | None], vocab_size: int, *, eos_id: int | None,
                  budget: Budget = Budget(), cache_dir: str | os.PathLike | None = None) -> Automaton:
    """The token automaton of `pattern` (a full match; Rust regex syntax) over a vocabulary given as
    `token_bytes[id]` (None: never allowed) for a model with `vocab_size` logits."""
    if len(token_bytes) > vocab_size:
        raise ConstraintError(f"the tokenizer has {len(token_bytes)} tokens, more than the model's "
                              f"vocab_size={vocab_size}")
    cache = None
    if cache_dir is not None:
        key = f"{CACHE_VERSION}\0{pattern}\0{vocabulary_hash(token_bytes, eos_id)}\0{vocab_size}"
        cache = Path(cache_dir) / "automata" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
        automaton = _load(cache, pattern) if cache.is_file() else None
        if automaton is not None:
            _check_budget(automaton, budget)
            return automaton
    start = time.perf_counter()
    index = _index(pattern, token_bytes, vocab_size, eos_id)
    next_state, token_class, accepting = _tables(pattern, index, vocab_size, budget)
    automaton = Automaton(pattern, next_state, token_class, accepting, time.perf_counter() - start)
    _check_budget(automaton, budget)
    if cache is not None:
        _save(cache, automaton)
    return automaton


# outlines-core keeps a token only if it leaves the DFA outside a match state or at a full match; since a
# regex-automata DFA reports a match one byte late, a token that continues past an accepting prefix through
# a non-accepting one (after "12": "." of "12.5") is dropped, so the language shrinks. Ending the pattern
# with a marker that no output contains moves every match to the marker, and the states that take the
# marker are the accepting ones. U+FFFF is a noncharacter: tokens that spell it are never allowed.
END = "\uffff"


def check_regex(pattern: str) -> None:
    """Raises ConstraintError for a pattern that is not a valid regular expression, without a vocabulary
    (a command line checks its flags before loading a model)."""
    try:
        _index(pattern, [], 0, None)
    except ConstraintError as err:
        if "cannot produce" not in str(err):  # with no tokens at all, that is the expected answer
            raise


def _index(pattern: str, token_bytes: Sequence[bytes | None], vocab_size: int,
           eos_id: int | None) -> outlines_core.Index:
    marker = END.encode()
    by_bytes: dict[bytes, list[int]] = {marker: [vocab_size]}  # the marker's id is past the vocabulary
    for token, piece in enumerate(token_bytes):
        # An empty token would let a row loop in place forever.
        if piece and token != eos_id and marker not in piece:
            by_bytes.setdefault(piece, []).append(token)
    if pattern.startswith("^"):  # a full match is implied; the marker must follow the pattern's end
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    try:  # outlines-core's EOS goes unused (stop tokens are ours), so it gets an id past the marker's
        return outlines_core.Index(f"(?:{pattern}){END}", outlines_core.Vocabulary(vocab_size + 1, by_bytes))
    except ValueError as err:
        message = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        if "incompatible with the regex" in message:
            raise ConstraintError(f"regex {pattern!r}: the vocabulary cannot produce it ({message})") from None
        try:  # outlines-core says only "error building NFA"; Python's parser says where (the syntaxes agree there)
            re.compile(pattern)
        except re.error as syntax:
            message = str(syntax)
        raise ConstraintError(f"regex {pattern!r}: not a valid regular expression ({message})") from None


def _tables(pattern: str, index: outlines_core.Index, vocab_size: int, budget: Budget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    transitions = index.get_transitions()  # {state: {token: next state}}
    if len(transitions) > budget.max_states:
        raise ConstraintError(f"regex {pattern!r}: {len(transitions)} automaton states, over the budget of "
                              f"{budget.max_states}")
    finals = set(index.get_final_states())
    states = sorted(transitions, key=lambda s: (s != index.get_initial_state(), s))  # the initial one first
    number = {s: i for i, s in enumerate(states)}
    edges = {number[s]: {t: number[n] for t, n in out.items() if t < vocab_size} for s, out in transitions.items()}
    accepting = np.array([transitions[s].get(vocab_size) in finals for s in states])  # takes the END marker
    live = _can_reach(edges, accepting)
    if not live[0]:
        raise ConstraintError(f"regex {pattern!r}: no complete match can be spelled with this vocabulary")
    keep = np.flatnonzero(_reachable(edges, live))  # state 0 stays first
    renumber = np.full(len(states), -1, np.int64)
    renumber[keep] = np.arange(len(keep))

    def row(state: int) -> np.ndarray:
        """[V] the next state of each token from `state` (-1: not allowed)."""
        out, next_of = edges[state], np.full(vocab_size, -1, np.int64)
        if out:
            next_of[np.fromiter(out.keys(), np.int64, len(out))] = renumber[np.fromiter(out.values(), np.int64,
                                                                                         len(out))]
        return next_of

    # Tokens with the same column (next state from every state) share a class. The columns are hashed one
    # row at a time, so memory stays O(S x C + V) rather than O(S x V); the tables are then checked exactly.
    digest = np.zeros(vocab_size, np.uint64)
    with np.errstate(over="ignore"):
        for state in keep:
            digest = (digest ^ (row(state) + 2).astype(np.uint64)) * np.uint64(0x100000001B3)
    never = np.full(1, 0, np.uint64)
    with np.errstate(over="ignore"):
        for _ in keep:
            never = (never ^ np.uint64(1)) * np.uint64(0x100000001B3)  # the digest of a never-allowed column
    unique, first, token_class = np.unique(np.concatenate([never, digest]), return_index=True,
                                           return_inverse=True)
    token_class = token_class.reshape(-1)
    order = np.argsort(unique != never[0], kind="stable")  # the never-allowed class first
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    token_class = relabel[token_class[1:]].astype(np.int32)
    representative = first[order] - 1  # a token of each class (-1: the never class may have none)
    next_state = np.full((len(keep), len(unique)), -1, np.int32)
    for i, state in enumerate(keep):
        next_of = row(state)
        next_state[i, 1:] = next_of[representative[1:]]
        if not np.array_equal(next_state[i, token_class], next_of):
            raise RuntimeError("token classes collided (64-bit hashes): please report this pattern")
    return next_state, token_class, accepting[keep]


def _can_reach(edges: dict[int, dict[int, int]], accepting: np.ndarray) -> np.ndarray:
    """[S] bool: states from which an accepting state can be reached (themselves included)."""
    into: dict[int, set[int]] = {}
    for s, out in edges.items():
        for n in out.values():
            into.setdefault(n, set()).add(s)
    live = accepting.copy()
    frontier = list(np.flatnonzero(accepting))
    while frontier:
        for s in into.get(int(frontier.pop()), ()):
            if not live[s]:
                live[s] = True
                frontier.append(s)
    return live


def _reachable(edges: dict[int, dict[int, int]], live: np.ndarray) -> np.ndarray:
    """[S] bool: live states reachable from state 0 through live states; edges into dead states are dropped."""
    for out in edges.values():
        for t in [t for t, n in out.items() if not live[n]]:
            del out[t]
    seen = np.zeros(len(live), bool)
    seen[0], frontier = True, [0]
    while frontier:
        for n in edges[frontier.pop()].values():
            if not seen[n]:
                seen[n] = True
                frontier.append(n)
    return seen


def _check_budget(automaton: Automaton, budget: Budget) -> None:
    if automaton.num_states > budget.max_states or automaton.nbytes > budget.max_bytes:
        raise ConstraintError(f"{automaton.num_states} states and {automaton.nbytes / 2 ** 20:.1f} MiB of tables, "
                              f"over the budget of {budget.max_states} states and "
                              f"{budget.max_bytes / 2 ** 20:.1f} MiB")


def _save(path: Path, automaton: Automaton) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, next_state=automaton.next_state, token_class=automaton.token_class,
             accepting=automaton.accepting, meta=np.frombuffer(json.dumps(
                 {"pattern": automaton.pattern, "compile_seconds": automaton.compile_seconds}).encode(), np.uint8))
    os.replace(tmp, path)


def _load(path: Path, pattern: str) -> Automaton | None:
    """The cached automaton, or None when the file is unreadable or holds another pattern (then it is rebuilt)."""
    try:
        with np.load(path) as data:
            meta = json.loads(data["meta"].tobytes())
            if meta["pattern"] != pattern:  # a hash collision, in principle
                return None
            return Automaton(pattern, data["next_state"], data["token_class"], data["accepting"],
                             meta["compile_seconds"], cached=True)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a truncated or foreign file: compile again
        return None


@flax.struct.dataclass
class Constrained:
    """The logits processor of one or more automata (tables stacked on a leading axis of K).

    next_state [K, S, C] int32, token_class [K, V] int32, accepting [K, S] bool, which [B] int32 (each
    prompt's automaton), stop [T] int32 (the loop's stop tokens: allowed only in accepting states).
    State: {"automaton": [B], "state": [B]} int32.
    """

    next_state: jax.Array
    token_class: jax.Array
    accepting: jax.Array
    which: jax.Array
    stop: jax.Array

    def init(self, prompt: jax.Array, prompt_lengths: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
        if self.token_class.shape[-1] != vocab_size:
            raise ConstraintError(f"the constraint covers {self.token_class.shape[-1]} token ids, the model "
                                  f"has vocab_size={vocab_size}")
        which = jnp.broadcast_to(self.which, prompt.shape[:1])
        return {"automaton": which, "state": jnp.zeros_like(which)}

    def allowed(self, state: dict[str, jax.Array]) -> jax.Array:
        """[R, V] bool: the tokens each row may choose next."""
        k, s = state["automaton"], state["state"]
        allowed = jnp.take_along_axis(self.next_state[k, s], self.token_class[k], axis=1) >= 0
        stops = is_stop(jnp.arange(self.token_class.shape[-1]), self.stop)
        return jnp.where(stops, self.accepting[k, s][:, None], allowed)

    def process(self, state: dict[str, jax.Array], logits: jax.Array, step: jax.Array) -> jax.Array:
        return jnp.where(self.allowed(state), logits, -jnp.inf)

    def update(self, state: dict[str, jax.Array], tokens: jax.Array) -> dict[str, jax.Array]:
        k, s = state["automaton"], state["state"]
        nxt = self.next_state[k, s, self.token_class[k, tokens]]
        # A stop token ends the row where it is; -1 (a token the mask forbade) cannot be chosen after it.
        return {**state, "state": jnp.where(is_stop(tokens, self.stop) | (nxt < 0), s, nxt)}

    def accepts(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """[B, N] bool: whether each output (tokens [B, N, M], lengths [B, N]) is a complete match."""
        b, n, m = tokens.shape
        k = jnp.repeat(jnp.broadcast_to(self.which, (b,)), n)
        flat, length = tokens.reshape(b * n, m), lengths.reshape(-1)

        def walk(carry: tuple[jax.Array, jax.Array], t: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
            s, ok = carry
            token = flat[:, t]
            inside = t < length
            stop = is_stop(token, self.stop) & inside
            nxt = self.next_state[k, jnp.maximum(s, 0), self.token_class[k, token]]
            ok = ok & ~(inside & ~stop & (nxt < 0)) & ~(stop & ~self.accepting[k, jnp.maximum(s, 0)])
            s = jnp.where(inside & ~stop, nxt, s)
            return (s, ok), None

        (s, ok), _ = jax.lax.scan(walk, (jnp.zeros_like(k), jnp.ones_like(k, bool)), jnp.arange(m))
        return (ok & (s >= 0) & self.accepting[k, jnp.maximum(s, 0)]).reshape(b, n)


def constrain(automata: Sequence[Automaton], stop_tokens: Sequence[int], which: Sequence[int] | None = None,
              ) -> Constrained:
    """The processor for `automata`; prompt b follows automaton `which[b]` (default: all follow the first)."""
    if not automata:
        raise ConstraintError("no automaton given")
    sizes = {len(a.token_class) for a in automata}
    if len(sizes) != 1:
        raise ConstraintError(f"automata compiled for different vocabulary sizes {sorted(sizes)}")
    states = max(a.num_states for a in automata)
    classes = max(a.num_classes for a in automata)
    next_state = np.full((len(automata), states, classes), -1, np.int32)
    accepting = np.zeros((len(automata), states), bool)
    for i, a in enumerate(automata):
        next_state[i, :a.num_states, :a.num_classes] = a.next_state
        accepting[i, :a.num_states] = a.accepting
    which = np.zeros((), np.int32) if which is None else np.asarray(which, np.int32)
    if which.size and (which.min() < 0 or which.max() >= len(automata)):
        raise ConstraintError(f"which={which.tolist()}: expected indices into the {len(automata)} automata")
    return Constrained(jnp.asarray(next_state), jnp.asarray(np.stack([a.token_class for a in automata])),
                       jnp.asarray(accepting), jnp.asarray(which), stop_array(tuple(stop_tokens)))
