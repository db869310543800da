"""Beam search: B prompts x W beams in one jitted `lax.while_loop`.

Each step scores every (beam, token) continuation by summed log-probability, keeps the best 2W (at most W
of them can end in a stop token, so W continue), reorders the processor states and the KV cache to the
surviving beams (the cache by its [B * W, S] slot indices: the beams share cached keys and values, see
models/kv_cache.py, so no step copies the cache to reorder it), and moves candidates that end in a stop
token into a separate pool of finished hypotheses ranked by the length-normalised score

    score / lp(len),  lp = 1 ("none"), len^alpha ("power"), ((5 + len) / 6)^alpha ("gnmt", as in GNMT/t5x)

where len counts the generated tokens, the stop token included. A prompt's search stops early when its
pool holds W hypotheses and (`early_stopping`):
  "eager"      nothing more (Hugging Face's early_stopping=True);
  "heuristic"  the best live beam, normalised at its current length, cannot beat the worst in the pool;
  "exact"      not even at the longest reachable length (scores only fall and alpha >= 0, so no live beam
               can enter the pool: the result is what running to max_new_tokens would give).
Beams still live at max_new_tokens compete as hypotheses of length max_new_tokens.

The best 2W of the W x V continuations are found in two stages, each beam's best 2W first (they contain
the overall best 2W), with `top_k_small` instead of `lax.top_k`, whose CPU sort takes milliseconds here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from decoding.generate import DecodeOutput
from decoding.prefill import check_inputs, is_stop, make_decode_step, prefill, stop_array
from decoding.processors import LogitsProcessor, apply_processors, init_states, take_rows, update_states
from models.config import ModelConfig
from models.kv_cache import KVCache, share_slots

LENGTH_PENALTIES = ("none", "power", "gnmt")
EARLY_STOPPING = ("eager", "heuristic", "exact")


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Static beam-search settings (a jit argument: changing any of them recompiles)."""

    num_beams: int = 4
    num_return: int = 1  # the n-best returned, best first
    length_penalty: str = "gnmt"
    alpha: float = 0.6
    early_stopping: str = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams!r}: expected a positive integer")
        if not isinstance(self.num_return, int) or not 1 <= self.num_return <= self.num_beams:
            raise ValueError(f"num_return={self.num_return!r}: expected 1 <= num_return <= num_beams={self.num_beams}")
        if self.length_penalty not in LENGTH_PENALTIES:
            raise ValueError(f"length_penalty={self.length_penalty!r}: expected one of {', '.join(LENGTH_PENALTIES)}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha!r}: expected >= 0 (longer hypotheses may only be favoured)")
        if self.early_stopping not in EARLY_STOPPING:
            raise ValueError(f"early_stopping={self.early_stopping!r}: expected one of {', '.join(EARLY_STOPPING)}")

    def penalty(self, length: jax.Array | int) -> jax.Array:
        """lp(len) > 0, non-decreasing in len."""
        length = jnp.asarray(length, jnp.float32)
        if self.length_penalty == "power":
            return length ** self.alpha
        if self.length_penalty == "gnmt":
            return ((5.0 + length) / 6.0) ** self.alpha
        return jnp.ones_like(length)


def top_k_small(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x [R, n] -> (values [R, k], indices [R, k]): the k largest (k <= n), largest first, ties by lower index.

    Without a sort: XLA's CPU sort is slow (`lax.top_k` of 4 x 8000 entries takes ~6 ms). Up to
    RANK_LIMIT entries, each entry's rank comes from comparing all pairs (no loop); beyond, k extractions
    from sqrt(n)-sized chunks, each reading the chunk maxima and one chunk (~30 us for k = 8 of 4 x 8000),
    where once only -inf is left the remaining picks are -inf and may repeat an index.
    """
    rows, n = x.shape
    if n <= RANK_LIMIT:
        i = jnp.arange(n)
        ahead = (x[:, None, :] > x[:, :, None]) | ((x[:, None, :] == x[:, :, None]) & (i < i[:, None]))
        rank = jnp.sum(ahead, axis=-1)  # [R, n]: a permutation of 0..n-1 per row
        indices = jnp.sum(jnp.where(rank[:, :, None] == jnp.arange(k), i[:, None], 0), axis=1).astype(jnp.int32)
        return jnp.take_along_axis(x, indices, axis=1), indices

    chunk = math.isqrt(n - 1) + 1
    chunks = -(-n // chunk)
    x = jnp.pad(x, ((0, 0), (0, chunks * chunk - n)), constant_values=-jnp.inf).reshape(rows, chunks, chunk)
    r = jnp.arange(rows)

    def extract(i, carry):
        x, maxima, values, indices = carry
        c = jnp.argmax(maxima, axis=-1)
        row = x[r, c]  # [R, chunk]
        j = jnp.argmax(row, axis=-1)
        values = values.at[:, i].set(row[r, j])
        indices = indices.at[:, i].set((c * chunk + j).astype(jnp.int32))
        row = row.at[r, j].set(-jnp.inf)
        return x.at[r, c].set(row), maxima.at[r, c].set(jnp.max(row, axis=-1)), values, indices

    init = (x, jnp.max(x, axis=-1), jnp.zeros((rows, k), x.dtype), jnp.zeros((rows, k), jnp.int32))
    _, _, values, indices = jax.lax.fori_loop(0, k, extract, init)
    return values, indices


RANK_LIMIT = 128  # n^2 comparisons per row: cheaper than a loop of extractions for small n


@flax.struct.dataclass
class BeamState:
    step: jax.Array  # [] int32: tokens chosen so far
    cache: tuple[KVCache, ...]  # B * W rows, beam-major within a prompt, sharing slots
    logits: jax.Array  # [B * W, V] fp32: next-token logits of the live beams
    alive_tokens: jax.Array  # [B, W, M] int32
    alive_logprobs: jax.Array  # [B, W, M] fp32
    alive_scores: jax.Array  # [B, W] summed log-probs; -inf: no beam
    done_tokens: jax.Array  # [B, W, M] int32: finished hypotheses, best first
    done_logprobs: jax.Array  # [B, W, M] fp32
    done_scores: jax.Array  # [B, W] length-normalised; -inf: empty slot
    done_lengths: jax.Array  # [B, W] int32
    stopped: jax.Array  # [B] bool: the prompt's search ended early
    processor_states: tuple[Any, ...]  # leaves [B * W, ...]


def _merge(scores: jax.Array, tokens: jax.Array, logprobs: jax.Array, lengths: jax.Array,
           keep: int) -> tuple[jax.Array, ...]:
    """The `keep` best of n hypotheses per prompt: scores/lengths [B, n], tokens/logprobs [B, n, M]."""
    best, idx = top_k_small(scores, keep)
    pick = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return best, pick(tokens), pick(logprobs), pick(lengths)


def beam_search(params: Any, cfg: ModelConfig, prompt: Any, prompt_lengths: Any, *, max_new_tokens: int,
                beam: BeamConfig = BeamConfig(), processors: Sequence[LogitsProcessor] = (),
                stop_tokens: Sequence[int] = (), pad_id: int = 0) -> DecodeOutput:
    """The `beam.num_return` best continuations of each right-padded prompt [B, P], best first.

    Returns tokens/logprobs [B, N, M], lengths [B, N] and length-normalised scores [B, N] (-inf marks a
    slot with no hypothesis, possible only with fewer than N distinct continuations). What recompiles:
    as for `decoding.generate.generate`, with `beam` in place of the sampler.
    """
    check_inputs(cfg, prompt, prompt_lengths, max_new_tokens)
    return _beam_search(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32),
                        tuple(processors), stop_array(stop_tokens), cfg=cfg, max_new_tokens=max_new_tokens,
                        beam=beam, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "beam", "pad_id"))
def _beam_search(params: Any, prompt: jax.Array, prompt_lengths: jax.Array, processors: tuple[LogitsProcessor, ...],
                 stop: jax.Array, *, cfg: ModelConfig, max_new_tokens: int, beam: BeamConfig,
                 pad_id: int) -> DecodeOutput:
    batch, width, m = prompt.shape[0], beam.num_beams, max_new_tokens
    vocab = cfg.vocab_size
    cache, logits = prefill(params, cfg, prompt, prompt_lengths, m, width)
    cache = share_slots(cache)
    decode_step = make_decode_step(params, cfg, batch * width, cache)
    states = init_states(processors, prompt, prompt_lengths, vocab)
    states = take_rows(states, jnp.repeat(jnp.arange(batch), width))
    first_only = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)  # identical beams: expand one
    empty = jnp.full((batch, width), -jnp.inf)
    state = BeamState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
        alive_tokens=jnp.full((batch, width, m), pad_id, jnp.int32),
        alive_logprobs=jnp.zeros((batch, width, m)), alive_scores=jnp.broadcast_to(first_only, (batch, width)),
        done_tokens=jnp.full((batch, width, m), pad_id, jnp.int32), done_logprobs=jnp.zeros((batch, width, m)),
        done_scores=empty, done_lengths=jnp.zeros((batch, width), jnp.int32),
        stopped=jnp.zeros((batch,), bool), processor_states=states)

    def cond(s: BeamState) -> jax.Array:
        return (s.step < m) & ~jnp.all(s.stopped)

    def body(s: BeamState) -> BeamState:
        t = s.step
        logits = apply_processors(processors, s.processor_states, s.logits, t)
        logp = jax.nn.log_softmax(logits)  # [B * W, V]
        # The best 2W of all W x V continuations are among each beam's best 2W: select in two stages.
        per_beam = min(2 * width, vocab)
        beam_logp, beam_token = top_k_small(logp, per_beam)  # [B * W, per_beam]
        total = s.alive_scores.reshape(-1, 1) + beam_logp
        scores, idx = top_k_small(total.reshape(batch, width * per_beam), 2 * width)  # [B, 2W]
        parent = idx // per_beam
        token = jnp.take_along_axis(beam_token.reshape(batch, -1), idx, axis=1)
        token_logp = jnp.take_along_axis(beam_logp.reshape(batch, -1), idx, axis=1)

        def extend(history: jax.Array, new: jax.Array) -> jax.Array:  # [B, W, M] -> [B, 2W, M]
            history = jnp.take_along_axis(history, parent[..., None], axis=1)
            return jax.lax.dynamic_update_slice(history, new[..., None], (0, 0, t))

        tokens, logprobs = extend(s.alive_tokens, token), extend(s.alive_logprobs, token_logp)
        ends = is_stop(token, stop)

        # Finished candidates join the pool; a prompt that stopped early keeps its pool as it is.
        new_done = jnp.where(ends & ~s.stopped[:, None], scores / beam.penalty(t + 1), -jnp.inf)
        done = _merge(jnp.concatenate([s.done_scores, new_done], 1),
                      jnp.concatenate([s.done_tokens, tokens], 1), jnp.concatenate([s.done_logprobs, logprobs], 1),
                      jnp.concatenate([s.done_lengths, jnp.full(token.shape, t + 1)], 1), width)
        done_scores, done_tokens, done_logprobs, done_lengths = done

        alive_scores, keep = top_k_small(jnp.where(ends, -jnp.inf, scores), width)  # [B, W] of the 2W
        pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
        rows = (jnp.arange(batch)[:, None] * width + pick(parent)).reshape(-1)
        new_tokens = pick(token).reshape(-1)
        states = update_states(processors, take_rows(s.processor_states, rows), new_tokens)
        logits, cache = decode_step(new_tokens, tuple(c.reorder(rows) for c in s.cache))

        best_alive = jnp.max(alive_scores, axis=-1)
        worst_done = jnp.min(done_scores, axis=-1)
        full = worst_done > -jnp.inf
        if beam.early_stopping == "eager":
            stop_now = full
        else:
            at = t + 1 if beam.early_stopping == "heuristic" else m
            stop_now = full & (best_alive / beam.penalty(at) <= worst_done)
        return BeamState(
            step=t + 1, cache=cache, logits=logits, alive_tokens=pick(tokens), alive_logprobs=pick(logprobs),
            alive_scores=alive_scores, done_tokens=done_tokens, done_logprobs=done_logprobs,
            done_scores=done_scores, done_lengths=done_lengths,
            stopped=s.stopped | stop_now | (best_alive == -jnp.inf), processor_states=states)

    s = jax.lax.while_loop(cond, body, state)
    # Beams live at the end (prompts that did not stop early) compete at length max_new_tokens.
    alive = jnp.where(s.stopped[:, None], -jnp.inf, s.alive_scores / beam.penalty(m))
    scores, tokens, logprobs, lengths = _merge(
        jnp.concatenate([s.done_scores, alive], 1), jnp.concatenate([s.done_tokens, s.alive_tokens], 1),
        jnp.concatenate([s.done_logprobs, s.alive_logprobs], 1),
        jnp.concatenate([s.done_lengths, jnp.full((batch, width), m, jnp.int32)], 1), beam.num_return)
    return DecodeOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, scores=scores)
