"""Beam search: B prompts x W beams in one jitted `lax.while_loop`.

Each step scores every (beam, token) continuation by summed log-probability, keeps the best
C = W x max(2, 1 + the number of stop tokens) candidates (at most C - W of them can end in a stop token, so
W continue), reorders the processor states and the KV cache to the surviving beams (the cache by its
[B * W, S] slot indices: the beams share cached keys and values, see models/kv_cache.py, so no step copies
the cache to reorder it), and moves candidates that end in a stop token into a separate pool of W finished
hypotheses per prompt, ranked by the length-normalised score

    score / lp(len),  lp = 1 ("none"), len^alpha ("power"), ((5 + len) / 6)^alpha ("gnmt", as in GNMT/t5x)

where len counts the generated tokens, the stop token included. A prompt's search stops early when its
pool holds W hypotheses and (`early_stopping`; in parentheses transformers' name for the same rule):
  "eager"      nothing more (True);
  "heuristic"  the best live beam, normalised at its current length, cannot beat the worst in the pool (False);
  "exact"      not even at its best reachable length, max_new_tokens where alpha > 0, else the current one
               (scores only fall, so no live beam can enter the pool: the result is what running to
               max_new_tokens would give) ("never").

Which candidates finish (`scoring`):
  "t5x"          (default) every candidate that ends in a stop token, as in t5x; beams still live at
                 max_new_tokens then compete as hypotheses of length max_new_tokens.
  "huggingface"  transformers' `_beam_search` (`BeamConfig.huggingface` takes its argument names): only
                 candidates ranked within the best W of the C join the pool (the rest keep W beams alive),
                 every candidate finishes at max_new_tokens (its max-length criterion), lp is
                 len^length_penalty of either sign, and the processors (min_new_tokens' too) edit the
                 log-probs, not renormalised after, instead of the logits.

Candidates are selected (`selection`) by `lax.top_k` ("sort") or without a sort by `top_k_small`
("chunked"), XLA:CPU's sort making `lax.top_k` take milliseconds here; "auto" picks "chunked" when the
default backend is the CPU, else "sort". Either way in two stages, each beam's best C first (they contain
the overall best C), with ties to the lower index, i.e. the lower (beam, token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from decoding.generate import DecodeOutput, completeness, min_new_tokens_processors, special_ids
from decoding.processors import LogitsProcessor, apply_processors, init_states, take_rows, update_states
from decoding.sampling import backend_default, total_order_key
from decoding.steps import check_inputs, decode_step, is_stop, prefill, stop_array
from models.config import ModelConfig
from models.kv_cache import KVCache, share_slots
from models.transformer import prepare_params

LENGTH_PENALTIES = ("none", "power", "gnmt")
EARLY_STOPPING = ("eager", "heuristic", "exact")
SCORINGS = ("t5x", "huggingface")
SELECTIONS = ("auto", "sort", "chunked")
HF_EARLY_STOPPING = {True: "eager", False: "heuristic", "never": "exact"}  # transformers' name -> ours


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Static beam-search settings (a jit argument: changing any of them recompiles). The module docstring
    describes each; `BeamConfig.huggingface(...)` builds transformers' beam search from its argument names."""

    num_beams: int = 4
    num_return: int = 1  # the n-best returned, best first
    length_penalty: str = "gnmt"
    alpha: float = 0.6
    early_stopping: str = "exact"
    scoring: str = "t5x"
    selection: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams!r}: expected a positive integer")
        if not isinstance(self.num_return, int) or not 1 <= self.num_return <= self.num_beams:
            raise ValueError(f"num_return={self.num_return!r}: expected 1 <= num_return <= num_beams={self.num_beams}")
        if self.length_penalty not in LENGTH_PENALTIES:
            raise ValueError(f"length_penalty={self.length_penalty!r}: expected one of {', '.join(LENGTH_PENALTIES)}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring={self.scoring!r}: expected one of {', '.join(SCORINGS)}")
        if self.scoring == "huggingface":
            if self.length_penalty != "power" or not math.isfinite(self.alpha):
                raise ValueError(f"length_penalty={self.length_penalty!r}, alpha={self.alpha!r}: "
                                 "scoring='huggingface' expects length_penalty='power' and a finite alpha "
                                 "(transformers' length_penalty)")
        elif not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha!r}: expected >= 0 (longer hypotheses may only be favoured)")
        if self.early_stopping not in EARLY_STOPPING:
            raise ValueError(f"early_stopping={self.early_stopping!r}: expected one of {', '.join(EARLY_STOPPING)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}: expected one of {', '.join(SELECTIONS)}")

    @classmethod
    def huggingface(cls, num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                    num_return_sequences: int = 1, selection: str = "auto") -> "BeamConfig":
        """transformers' beam search (`generate(num_beams=..., do_sample=False, ...)`) under its names:
        hypotheses scored sum_logprobs / generated_length ** length_penalty; early_stopping True, False or
        "never" (the module docstring says what each does)."""
        if not (isinstance(early_stopping, bool) or early_stopping == "never"):
            raise ValueError(f"early_stopping={early_stopping!r}: expected True, False or 'never'")
        return cls(num_beams=num_beams, num_return=num_return_sequences, length_penalty="power",
                   alpha=float(length_penalty), early_stopping=HF_EARLY_STOPPING[early_stopping],
                   scoring="huggingface", selection=selection)

    def penalty(self, length: jax.Array | int) -> jax.Array:
        """lp(len) > 0, non-decreasing in len where alpha >= 0."""
        length = jnp.asarray(length, jnp.float32)
        if self.length_penalty == "power":
            return length ** self.alpha
        if self.length_penalty == "gnmt":
            return ((5.0 + length) / 6.0) ** self.alpha
        return jnp.ones_like(length)


def top_k_small(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """x [R, n] -> (values [R, k], indices [R, k]): the k largest (k <= n), largest first, ties by lower index,
    in lax.top_k's order (floats compared in total order: -0.0 below +0.0).

    Without a sort: XLA's CPU sort is slow (`lax.top_k` of 4 x 8000 entries takes ~6 ms). Up to
    RANK_LIMIT entries, each entry's rank comes from comparing all pairs (no loop); beyond, k extractions
    from sqrt(n)-sized chunks, each reading the chunk maxima and one chunk (~30 us for k = 8 of 4 x 8000).
    Both compare int32 keys in lax.top_k's total order; the extraction marks a taken entry below every
    float (-inf included), so no index repeats.
    """
    rows, n = x.shape
    keys = total_order_key(x)
    if n <= RANK_LIMIT:
        i = jnp.arange(n)
        ahead = (keys[:, None, :] > keys[:, :, None]) | ((keys[:, None, :] == keys[:, :, None]) & (i < i[:, None]))
        rank = jnp.sum(ahead, axis=-1)  # [R, n]: a permutation of 0..n-1 per row
        indices = jnp.sum(jnp.where(rank[:, :, None] == jnp.arange(k), i[:, None], 0), axis=1).astype(jnp.int32)
        return jnp.take_along_axis(x, indices, axis=1), indices

    chunk = math.isqrt(n - 1) + 1
    chunks = -(-n // chunk)
    taken = jnp.iinfo(jnp.int32).min  # the key of no float32 but one NaN: padding and extracted entries
    keys = jnp.pad(keys, ((0, 0), (0, chunks * chunk - n)), constant_values=taken).reshape(rows, chunks, chunk)
    r = jnp.arange(rows)

    def extract(i, carry):
        keys, maxima, indices = carry
        c = jnp.argmax(maxima, axis=-1)
        row = keys[r, c]  # [R, chunk]
        j = jnp.argmax(row, axis=-1)
        indices = indices.at[:, i].set((c * chunk + j).astype(jnp.int32))
        row = row.at[r, j].set(taken)
        return keys.at[r, c].set(row), maxima.at[r, c].set(jnp.max(row, axis=-1)), indices

    init = (keys, jnp.max(keys, axis=-1), jnp.zeros((rows, k), jnp.int32))
    _, _, indices = jax.lax.fori_loop(0, k, extract, init)
    return jnp.take_along_axis(x, indices, axis=1), indices


def select_top_k(x: jax.Array, k: int, selection: str) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` ("sort") or `top_k_small` ("chunked"); "auto" by backend. Identical results."""
    if backend_default(selection, "chunked", "sort") == "sort":
        return jax.lax.top_k(x, k)
    return top_k_small(x, k)


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
           keep: int, selection: str) -> tuple[jax.Array, ...]:
    """The `keep` best of n hypotheses per prompt: scores/lengths [B, n], tokens/logprobs [B, n, M]."""
    best, idx = select_top_k(scores, keep, selection)
    pick = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return best, pick(tokens), pick(logprobs), pick(lengths)


def beam_search(params: Any, cfg: ModelConfig, prompt: Any, prompt_lengths: Any, *, max_new_tokens: int,
                beam: BeamConfig = BeamConfig(), processors: Sequence[LogitsProcessor] = (),
                stop_tokens: Sequence[int] | None = None, pad_id: int | None = None, min_new_tokens: int = 0,
                tokenizer: Any = None) -> DecodeOutput:
    """The `beam.num_return` best continuations of each right-padded prompt [B, P], best first.

    Returns tokens/logprobs [B, N, M], lengths [B, N] and length-normalised scores [B, N] (-inf marks a
    slot with no hypothesis, possible only with fewer than N distinct continuations). `stop_tokens`,
    `pad_id`, `min_new_tokens`, `tokenizer` and what recompiles: as for `decoding.generate.generate`, with
    `beam` and the number of distinct stop tokens in place of the sampler.
    """
    check_inputs(cfg, prompt, prompt_lengths, max_new_tokens)
    stop_tokens, pad_id = special_ids(tokenizer, stop_tokens, pad_id)
    stop = stop_array(stop_tokens)
    processors = min_new_tokens_processors(min_new_tokens, max_new_tokens, stop) + tuple(processors)
    candidates = beam.num_beams * max(2, 1 + len(set(stop_tokens)))
    return _beam_search(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32),
                        processors, stop, jnp.asarray(pad_id, jnp.int32), cfg=cfg, max_new_tokens=max_new_tokens,
                        beam=beam, candidates=candidates)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "beam", "candidates"))
def _beam_search(params: Any, prompt: jax.Array, prompt_lengths: jax.Array, processors: tuple[LogitsProcessor, ...],
                 stop: jax.Array, pad_id: jax.Array, *, cfg: ModelConfig, max_new_tokens: int, beam: BeamConfig,
                 candidates: int) -> DecodeOutput:
    batch, width, m = prompt.shape[0], beam.num_beams, max_new_tokens
    vocab = cfg.vocab_size
    huggingface = beam.scoring == "huggingface"
    top_k = functools.partial(select_top_k, selection=beam.selection)
    per_beam = min(candidates, vocab)
    candidates = min(candidates, width * per_beam)
    cache, logits = prefill(params, cfg, prompt, prompt_lengths, m, width)
    cache = share_slots(cache, width)
    step_params = prepare_params(params, cfg, batch * width)  # once, before the loop
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
        if huggingface:
            logp = apply_processors(processors, s.processor_states, jax.nn.log_softmax(s.logits), t)
        else:
            logp = jax.nn.log_softmax(apply_processors(processors, s.processor_states, s.logits, t))  # [B * W, V]
        # The best C of all W x V continuations are among each beam's best C: select in two stages.
        beam_logp, beam_token = top_k(logp, per_beam)  # [B * W, per_beam]
        total = s.alive_scores.reshape(-1, 1) + beam_logp
        scores, idx = top_k(total.reshape(batch, width * per_beam), candidates)  # [B, C], best first
        parent = idx // per_beam
        token = jnp.take_along_axis(beam_token.reshape(batch, -1), idx, axis=1)
        token_logp = jnp.take_along_axis(beam_logp.reshape(batch, -1), idx, axis=1)

        def extend(history: jax.Array, new: jax.Array) -> jax.Array:  # [B, W, M] -> [B, C, M]
            history = jnp.take_along_axis(history, parent[..., None], axis=1)
            return jax.lax.dynamic_update_slice(history, new[..., None], (0, 0, t))

        tokens, logprobs = extend(s.alive_tokens, token), extend(s.alive_logprobs, token_logp)
        ends = is_stop(token, stop)
        joins = ~s.stopped[:, None]  # a prompt that stopped early keeps its pool as it is
        if huggingface:
            # transformers' max-length criterion finishes every candidate at max_new_tokens, and only the
            # best W candidates may join the pool (the others are there to keep W beams alive).
            ends = ends | (t + 1 == m)
            joins = joins & (jnp.arange(candidates) < width)

        new_done = jnp.where(ends & joins, scores / beam.penalty(t + 1), -jnp.inf)
        done = _merge(jnp.concatenate([s.done_scores, new_done], 1),
                      jnp.concatenate([s.done_tokens, tokens], 1), jnp.concatenate([s.done_logprobs, logprobs], 1),
                      jnp.concatenate([s.done_lengths, jnp.full(token.shape, t + 1)], 1), width, beam.selection)
        done_scores, done_tokens, done_logprobs, done_lengths = done

        alive_scores, keep = top_k(jnp.where(ends, -jnp.inf, scores), width)  # [B, W] of the C
        pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
        rows = (jnp.arange(batch)[:, None] * width + pick(parent)).reshape(-1)
        new_tokens = pick(token).reshape(-1)
        states = update_states(processors, take_rows(s.processor_states, rows), new_tokens)
        logits, cache = decode_step(step_params, cfg, new_tokens, tuple(c.reorder(rows) for c in s.cache))

        best_alive = jnp.max(alive_scores, axis=-1)
        worst_done = jnp.min(done_scores, axis=-1)
        full = worst_done > -jnp.inf
        if beam.early_stopping == "eager":
            stop_now = full
        else:  # the penalty grows with the length only where alpha > 0
            at = m if beam.early_stopping == "exact" and beam.alpha > 0 else t + 1
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
        jnp.concatenate([s.done_lengths, jnp.full((batch, width), m, jnp.int32)], 1), beam.num_return,
        beam.selection)
    return DecodeOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, scores=scores,
                        complete=completeness(processors, tokens, lengths))
