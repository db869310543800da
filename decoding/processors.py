"""Logits processors: logit edits that may carry their own state through the decode loop.

A processor is a pytree (a `flax.struct.dataclass`): its array fields are traced, so changing their
values does not recompile; its type and static fields are part of the compiled program. It implements

    init(prompt [B, P], prompt_lengths [B], vocab_size) -> state    every state leaf has rows first: [B, ...]
    process(state, logits [R, V], step []) -> logits [R, V]          step: index of the token being chosen
    update(state, tokens [R]) -> state                               after the tokens of this step are chosen

The loops hold a tuple of states (one per processor) in their state pytree. `init` sees one row per
prompt; the loop then repeats the state rows to the R rows it decodes (samples or beams of a prompt are
adjacent rows), and beam search gathers them with the surviving beams each step. `update` sees only the
tokens rows chose: a row that has finished keeps the state it had at its stop token (the pad id written
after it is not a token). Processors run in order, before the sampling filters, and define the
distribution the log-probs and beam scores refer to (beam search with `scoring="huggingface"` applies them
to the log-probs instead, as transformers does); they must leave at least one token with a finite logit.
A processor may also say whether finished outputs are acceptable, `accepts(tokens [B, N, M], lengths [B, N])
-> [B, N] bool`, which the loops report as `DecodeOutput.complete`: constrained decoding
(decoding/constraint.py) is such a processor, with state = automaton state, process = mask, update =
transition.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from decoding.steps import is_stop

State = Any


class LogitsProcessor(Protocol):
    def init(self, prompt: jax.Array, prompt_lengths: jax.Array, vocab_size: int) -> State: ...

    def process(self, state: State, logits: jax.Array, step: jax.Array) -> jax.Array: ...

    def update(self, state: State, tokens: jax.Array) -> State: ...


def init_states(processors: Sequence[LogitsProcessor], prompt: jax.Array, prompt_lengths: jax.Array,
                vocab_size: int) -> tuple[State, ...]:
    return tuple(p.init(prompt, prompt_lengths, vocab_size) for p in processors)


def apply_processors(processors: Sequence[LogitsProcessor], states: tuple[State, ...], logits: jax.Array,
                     step: jax.Array) -> jax.Array:
    for p, s in zip(processors, states):
        logits = p.process(s, logits, step)
    return logits


def update_states(processors: Sequence[LogitsProcessor], states: tuple[State, ...], tokens: jax.Array,
                  live: jax.Array | None = None) -> tuple[State, ...]:
    """live [R] bool (None: all): rows whose states advance; the others keep theirs."""
    new = tuple(p.update(s, tokens) for p, s in zip(processors, states))
    if live is None:
        return new
    return jax.tree.map(lambda n, o: jnp.where(live.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, states)


def take_rows(tree: Any, rows: jax.Array) -> Any:
    """Gathers every leaf along its leading (row) axis: rows [R'] int -> leaves [R', ...]."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


def _last_prompt_token(prompt: jax.Array, prompt_lengths: jax.Array) -> jax.Array:
    return jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]


@flax.struct.dataclass
class RepetitionPenalty:
    """CTRL-style penalty on every token already in the prompt or the output: a positive logit is divided
    by the penalty, a negative one multiplied (so > 1 discourages repeats, 1 is off).

    penalty: [] or [B] (one per prompt). State: {"penalty": [B], "seen": [B, V] bool}.
    """

    penalty: jax.Array

    def init(self, prompt: jax.Array, prompt_lengths: jax.Array, vocab_size: int) -> State:
        batch, length = prompt.shape
        valid = jnp.arange(length)[None, :] < prompt_lengths[:, None]
        counts = jnp.zeros((batch, vocab_size), jnp.int32).at[jnp.arange(batch)[:, None], prompt].add(valid)
        seen = counts > 0
        penalty = jnp.broadcast_to(jnp.asarray(self.penalty, jnp.float32), (batch,))
        return {"penalty": penalty, "seen": seen}

    def process(self, state: State, logits: jax.Array, step: jax.Array) -> jax.Array:
        pen = state["penalty"][:, None]
        return jnp.where(state["seen"], jnp.where(logits > 0, logits / pen, logits * pen), logits)

    def update(self, state: State, tokens: jax.Array) -> State:
        seen = state["seen"].at[jnp.arange(tokens.shape[0]), tokens].set(True)
        return {**state, "seen": seen}


@flax.struct.dataclass
class BannedBigrams:
    """Forbids token b right after token a for every pair (a, b): a one-state-per-row automaton whose
    state is the previous token (the prompt's last token at the start).

    pairs: [Q, 2] int32. State: previous token [B] int32.
    """

    pairs: jax.Array

    def init(self, prompt: jax.Array, prompt_lengths: jax.Array, vocab_size: int) -> State:
        return _last_prompt_token(prompt, prompt_lengths)

    def process(self, state: State, logits: jax.Array, step: jax.Array) -> jax.Array:
        hits = (state[:, None] == self.pairs[None, :, 0]).astype(jnp.float32)  # [R, Q]
        banned = hits @ jax.nn.one_hot(self.pairs[:, 1], logits.shape[-1]) > 0  # [R, V]
        return jnp.where(banned, -jnp.inf, logits)

    def update(self, state: State, tokens: jax.Array) -> State:
        return tokens


@flax.struct.dataclass
class MinNewTokens:
    """Stop tokens get -inf until `min_new_tokens` tokens have been generated (transformers'
    MinNewTokensLengthLogitsProcessor). The loops add it first when their `min_new_tokens` > 0.

    min_new_tokens: [] int32. stop: [S] int32 (decoding.steps.stop_array: -1 pads). No state.
    """

    min_new_tokens: jax.Array
    stop: jax.Array

    def init(self, prompt: jax.Array, prompt_lengths: jax.Array, vocab_size: int) -> State:
        return ()

    def process(self, state: State, logits: jax.Array, step: jax.Array) -> jax.Array:
        stops = is_stop(jnp.arange(logits.shape[-1]), self.stop)
        return jnp.where(stops & (step < self.min_new_tokens), -jnp.inf, logits)

    def update(self, state: State, tokens: jax.Array) -> State:
        return state
