"""Jitted generation: one compiled program prefills the prompts into the KV cache, then runs a
`lax.while_loop` of single-token decode steps. No Python runs per token.

    config, values = make_sampler(batch, temperature=0.8, top_p=0.9)
    out = generate(params, cfg, prompt, prompt_lengths, key, max_new_tokens=64, sampler=config,
                   sampling=values, processors=(RepetitionPenalty(1.2),), stop_tokens=(eos,))

The loop state is a pytree (`DecodeState`) holding, besides the cache and outputs, one state per logits
processor (decoding/processors.py). Each step: processors -> sampling filters -> token -> model.

Stop and pad ids (here and in beam search): explicit arguments win (`stop_tokens=()` is no stop token);
`stop_tokens=None` is `(tokenizer.eos_id,)` with a `tokenizer` (any object with `eos_id` and `pad_id`;
an id that is None or negative counts as absent), else no stop token; `pad_id=None` is the tokenizer's
pad id, else the first stop token, else 0. `min_new_tokens` gives the stop tokens -inf until that many
tokens have been generated.

What recompiles: shapes (batch, padded prompt width, the stop-token count past each multiple of 4),
`cfg`, `max_new_tokens`, `num_samples`, whether `min_new_tokens` is 0, the `SamplerConfig`, the
processors' types and static fields, and `stream` (the function). What does not: the parameters, prompts
and their lengths, the key, the per-row sampling values, the processors' array values, the stop token
ids, `pad_id`, the value of `min_new_tokens`, `stream_every`.

Command line (decoding/cli.py):
    python -m decoding.generate --checkpoint RUN_DIR --prompt "Once" --strategy sample --top-p 0.9
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decoding.processors import (LogitsProcessor, MinNewTokens, apply_processors, init_states, take_rows,
                                 update_states)
from decoding.sampling import SamplerConfig, SamplingParams, choose_tokens, repeat_rows
from decoding.steps import check_inputs, check_prompt, decode_step, is_stop, prefill, stop_array
from models.config import ModelConfig
from models.kv_cache import KVCache
from models.transformer import Transformer, prepare_params

__all__ = ["DecodeOutput", "DecodeState", "check_prompt", "generate", "greedy_by_recompute"]

# stream(tokens [R, M] int32, lengths [R] int32): the tokens so far (pad_id past each row's length),
# called on the host every `stream_every` steps and after the last, in order.
StreamFn = Callable[[np.ndarray, np.ndarray], None]


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32: tokens chosen so far
    cache: tuple[KVCache, ...]  # R rows
    logits: jax.Array  # [R, V] fp32: the model's next-token logits
    tokens: jax.Array  # [R, M] int32: chosen tokens, pad_id after a row stops
    logprobs: jax.Array  # [R, M] fp32: their log-probabilities, 0 after a row stops
    lengths: jax.Array  # [R] int32: tokens generated, the stop token included
    done: jax.Array  # [R] bool
    processor_states: tuple[Any, ...]  # one per processor, leaves [R, ...]


@flax.struct.dataclass
class DecodeOutput:
    """N outputs per prompt: samples (in draw order) or beam hypotheses (best first)."""

    tokens: jax.Array  # [B, N, M] int32, pad_id after the stop token
    logprobs: jax.Array  # [B, N, M] fp32, per token, under the processed distribution; 0 after the stop
    lengths: jax.Array  # [B, N] int32, the stop token included
    scores: jax.Array  # [B, N] fp32: summed log-probs (sampling) or length-normalised scores (beams)
    complete: jax.Array  # [B, N] bool: False where a constraint (decoding/constraint.py) was left unfinished


def completeness(processors: Sequence[LogitsProcessor], tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """[B, N] bool: every processor that can tell (an `accepts` method: constraints) accepts the output."""
    complete = jnp.ones(lengths.shape, bool)
    for p in processors:
        if hasattr(p, "accepts"):
            complete = complete & p.accepts(tokens, lengths)
    return complete


def generate(params: Any, cfg: ModelConfig, prompt: Any, prompt_lengths: Any, rng: jax.Array | None = None, *,
             max_new_tokens: int, sampler: SamplerConfig = SamplerConfig(), sampling: SamplingParams | None = None,
             processors: Sequence[LogitsProcessor] = (), stop_tokens: Sequence[int] | None = None,
             pad_id: int | None = None, min_new_tokens: int = 0, tokenizer: Any = None, num_samples: int = 1,
             stream: StreamFn | None = None, stream_every: int = 8) -> DecodeOutput:
    """Continues right-padded prompts [B, P] (row b valid up to prompt_lengths[b]) greedily or by sampling.

    Each prompt gets `num_samples` rows; a row stops after a token in `stop_tokens` (not before
    `min_new_tokens` tokens) or `max_new_tokens`. Defaults of `stop_tokens` / `pad_id` from `tokenizer`:
    the module docstring.
    `sampling` (from `make_sampler`) is required when `sampler.sample`; `rng` (a PRNG key) then makes the
    result reproducible. `stream` receives the tokens so far on the host every `stream_every` steps: one
    host callback from inside the loop costs 0.3-1 ms on a busy 2-core CPU, as much as a whole decode step
    of a 7M-param model, so it is not made every step (experiments/benchmark_decode.py measures it).
    """
    check_inputs(cfg, prompt, prompt_lengths, max_new_tokens)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: expected a positive integer")
    if not isinstance(stream_every, int) or stream_every < 1:
        raise ValueError(f"stream_every={stream_every!r}: expected a positive integer")
    if sampler.sample:
        if sampling is None:
            raise ValueError("sampling: required when sampler.sample is set (see decoding.sampling.make_sampler)")
        if np.shape(sampling.temperature) != np.shape(prompt)[:1]:
            raise ValueError(f"sampling: expected one value per prompt ({np.shape(prompt)[0]}), "
                             f"got shape {np.shape(sampling.temperature)}")
    stop_tokens, pad_id = special_ids(tokenizer, stop_tokens, pad_id)
    stop = stop_array(stop_tokens)
    processors = min_new_tokens_processors(min_new_tokens, max_new_tokens, stop) + tuple(processors)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), rng,
                     sampling if sampler.sample else None, processors, stop, jnp.asarray(pad_id, jnp.int32),
                     cfg=cfg, max_new_tokens=max_new_tokens, sampler=sampler, num_samples=num_samples,
                     stream=stream, stream_every=jnp.asarray(stream_every, jnp.int32))


def _present(token_id: Any) -> int | None:
    """A tokenizer's special id, or None where it has none (None, or negative as in SentencePiece)."""
    return None if token_id is None or int(token_id) < 0 else int(token_id)


def special_ids(tokenizer: Any, stop_tokens: Sequence[int] | None, pad_id: int | None) -> tuple[tuple[int, ...], int]:
    """(stop tokens, pad id) by the rule in the module docstring: explicit arguments, then the tokenizer's."""
    if stop_tokens is None:
        eos = _present(tokenizer.eos_id) if tokenizer is not None else None
        stop_tokens = () if eos is None else (eos,)
    stop_tokens = tuple(stop_tokens)
    if pad_id is None:
        pad_id = _present(tokenizer.pad_id) if tokenizer is not None else None
    if pad_id is None:
        pad_id = stop_tokens[0] if stop_tokens else 0
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise ValueError(f"pad_id={pad_id!r}: expected an integer token id")
    return stop_tokens, int(pad_id)


def min_new_tokens_processors(min_new_tokens: int, max_new_tokens: int, stop: jax.Array) -> tuple[MinNewTokens, ...]:
    """The processor that holds the stop tokens back, first in line; none for 0 (nothing compiled in)."""
    if (isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, (int, np.integer))
            or not 0 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"min_new_tokens={min_new_tokens!r}: expected an integer with "
                         f"0 <= min_new_tokens <= max_new_tokens={max_new_tokens}")
    return (MinNewTokens(jnp.asarray(min_new_tokens, jnp.int32), stop),) if min_new_tokens > 0 else ()


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampler", "num_samples", "stream"))
def _generate(params: Any, prompt: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
              sampling: SamplingParams | None, processors: tuple[LogitsProcessor, ...], stop: jax.Array,
              pad_id: jax.Array, *, cfg: ModelConfig, max_new_tokens: int, sampler: SamplerConfig,
              num_samples: int, stream: StreamFn | None, stream_every: jax.Array) -> DecodeOutput:
    batch = prompt.shape[0]
    rows = batch * num_samples
    cache, logits = prefill(params, cfg, prompt, prompt_lengths, max_new_tokens, num_samples)
    states = init_states(processors, prompt, prompt_lengths, cfg.vocab_size)
    states = take_rows(states, jnp.repeat(jnp.arange(batch), num_samples))
    if sampling is not None:
        sampling = repeat_rows(sampling, num_samples)

    state = DecodeState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
        tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32), lengths=jnp.zeros((rows,), jnp.int32),
        done=jnp.zeros((rows,), bool), processor_states=states)
    step_params = prepare_params(params, cfg, rows)  # once, before the loop

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits = apply_processors(processors, s.processor_states, s.logits, s.step)
        token = choose_tokens(sampler, sampling, logits, jax.random.fold_in(rng, s.step))
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(s.done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        lengths = jnp.where(s.done, s.lengths, s.step + 1)
        done = s.done | is_stop(token, stop)
        if stream is not None:
            last = (s.step + 1 == max_new_tokens) | jnp.all(done)
            jax.lax.cond(((s.step + 1) % stream_every == 0) | last,
                         lambda: jax.debug.callback(stream, tokens, lengths, ordered=True), lambda: None)
        logits, cache = decode_step(step_params, cfg, token, s.cache)
        return DecodeState(
            step=s.step + 1, cache=cache, logits=logits, tokens=tokens,
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, jnp.where(s.done, 0.0, logprob)[:, None], (0, s.step)),
            lengths=lengths, done=done,
            processor_states=update_states(processors, s.processor_states, token, live=~s.done))

    state = jax.lax.while_loop(cond, body, state)
    shape = (batch, num_samples)
    tokens, lengths = state.tokens.reshape(*shape, -1), state.lengths.reshape(shape)
    return DecodeOutput(tokens=tokens, logprobs=state.logprobs.reshape(*shape, -1), lengths=lengths,
                        scores=jnp.sum(state.logprobs, -1).reshape(shape),
                        complete=completeness(processors, tokens, lengths))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_by_recompute(params: Any, cfg: ModelConfig, prompt: jax.Array, prompt_lengths: jax.Array, *,
                        max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The reference the cache is tested and benchmarked against: greedy decoding that reruns the model
    over the whole sequence (a fixed [B, P + M] buffer, causal, so later slots do not matter) every step.

    Returns (tokens [B, M], log-probs [B, M]); no stop tokens.
    """
    model = Transformer(cfg)
    batch = prompt.shape[0]
    seq = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)))
    rows = jnp.arange(batch)

    def body(step: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        seq, logprobs = carry
        logits, _, _ = model.apply({"params": params}, seq)
        logits = logits[rows, prompt_lengths - 1 + step]
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return seq.at[rows, prompt_lengths + step].set(token), logprobs.at[:, step].set(logprob)

    seq, logprobs = jax.lax.fori_loop(0, max_new_tokens, body,
                                      (seq, jnp.zeros((batch, max_new_tokens), jnp.float32)))
    generated = jnp.take_along_axis(seq, prompt_lengths[:, None] + jnp.arange(max_new_tokens), axis=1)
    return generated, logprobs


if __name__ == "__main__":
    import sys

    from decoding.cli import main

    sys.exit(main())
