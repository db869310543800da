"""Jitted generation: one compiled program prefills the prompt into the KV cache, then runs a
`lax.while_loop` of single-token decode steps. No Python runs per token.

The loop state is a pytree (`DecodeState`); the sampler settings are static arguments.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.kv_cache import KVCache, init_cache, with_lengths
from models.transformer import Transformer


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32: tokens generated so far
    cache: tuple[KVCache, ...]
    logits: jax.Array  # [B, V] fp32: next-token logits
    tokens: jax.Array  # [B, M] int32: generated tokens (pad_id after a row stops)
    done: jax.Array  # [B] bool
    rng: jax.Array


def check_prompt(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """A prompt plus its continuation must fit the model's context."""
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}")


def next_token(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    """logits [B, V] -> [B] int32: argmax when temperature == 0, else a sample of softmax(logits / T)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id", "pad_id"))
def generate(params: Any, cfg: ModelConfig, prompt: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
             *, max_new_tokens: int, temperature: float = 0.0, eos_id: int = -1,
             pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Continues right-padded prompts.

    prompt: [B, P] int32 (row b valid up to prompt_lengths[b]); returns (tokens [B, M], lengths [B]),
    where a row's length counts its tokens up to and including EOS.
    """
    model = Transformer(cfg)
    batch, prompt_len = prompt.shape
    cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
    logits, cache, _ = model.apply({"params": params}, prompt, cache=cache)
    cache = with_lengths(cache, prompt_lengths)  # slots past a row's prompt are overwritten by decoding
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]

    state = DecodeState(step=jnp.zeros((), jnp.int32), cache=cache, logits=last,
                        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                        done=jnp.zeros((batch,), bool), rng=rng)

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        rng, key = jax.random.split(s.rng)
        token = jnp.where(s.done, pad_id, next_token(s.logits, key, temperature))
        tokens = s.tokens.at[:, s.step].set(token)
        done = s.done | (token == eos_id)
        logits, cache, _ = model.apply({"params": params}, token[:, None], cache=s.cache)
        return DecodeState(step=s.step + 1, cache=cache, logits=logits[:, 0], tokens=tokens, done=done, rng=rng)

    state = jax.lax.while_loop(cond, body, state)
    is_eos = state.tokens == eos_id
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, state.step)
    return state.tokens, first_eos.astype(jnp.int32)
