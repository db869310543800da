"""The model's two steps in a decode loop (the prompt prefilled into a KV cache, then one token per row),
and the input checks and stop tokens both loops share.

What must happen once before the loop (weights cast to the compute dtype, or packed for the CPU kernel)
is `models.transformer.prepare_params`, a transform of the params pytree: the step itself is `model.apply`.

Decoding always runs the loop layout (models/layers.py): a scanned model's params are unstacked once, by
`prefill` and by `prepare_params`, and both steps apply `loop_config(cfg)`. The KV cache stays a tuple of
per-layer pytrees, which the loops update, reorder and share by slot layer by layer; under a scan it would
have to be stacked [L, ...] and threaded through the scan as inputs and outputs, and scanning buys nothing
here: it saves the train step's compile time and activations, while a decode program is one small step.
Unstacking costs one slice per block per call, not per token.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.kv_cache import KVCache, init_cache, with_lengths
from models.layers import loop_config, unstack_layers
from models.transformer import Transformer


def check_prompt(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """A prompt plus its continuation must fit the model's context."""
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}")


def check_inputs(cfg: ModelConfig, prompt: Any, prompt_lengths: Any, max_new_tokens: int) -> None:
    """One-line ValueErrors for prompts the loops cannot run: shapes, lengths, ids, context."""
    prompt, lengths = np.asarray(prompt), np.asarray(prompt_lengths)
    if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt: expected a [batch, length] integer array, got {prompt.dtype} {prompt.shape}")
    if lengths.shape != prompt.shape[:1]:
        raise ValueError(f"prompt_lengths: expected shape {prompt.shape[:1]} (one per prompt), got {lengths.shape}")
    if np.any(lengths < 1) or np.any(lengths > prompt.shape[1]):
        raise ValueError(f"prompt_lengths={lengths.tolist()}: expected 1 <= length <= {prompt.shape[1]} "
                         "(the padded prompt width)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    check_prompt(cfg, prompt.shape[1], max_new_tokens)
    valid = np.arange(prompt.shape[1])[None, :] < lengths[:, None]
    if np.any(valid & ((prompt < 0) | (prompt >= cfg.vocab_size))):
        raise ValueError(f"prompt: token ids must be in [0, model.vocab_size={cfg.vocab_size})")


def stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop token ids as a [S] array, S a multiple of 4 filled with -1 (never a token): the ids are not
    compiled in, and any set of up to 4 of them shares one program."""
    ids = np.asarray(list(stop_tokens), np.int32)
    if ids.ndim != 1:
        raise ValueError(f"stop_tokens: expected a flat list of token ids, got shape {ids.shape}")
    size = max(4, -(-len(ids) // 4) * 4)
    return jnp.asarray(np.pad(ids, (0, size - len(ids)), constant_values=-1))


def is_stop(tokens: jax.Array, stop: jax.Array) -> jax.Array:
    """tokens [...] int, stop [S] -> [...] bool."""
    return jnp.any(tokens[..., None] == stop, axis=-1)


def prefill(params: Any, cfg: ModelConfig, prompt: jax.Array, prompt_lengths: jax.Array, max_new_tokens: int,
            repeats: int) -> tuple[tuple[KVCache, ...], jax.Array]:
    """Runs right-padded prompts [B, P] through the model into a cache of P + max_new_tokens slots.

    Returns (caches with each row's length set to its prompt length, next-token logits [B * repeats, V]),
    each prompt's row repeated `repeats` times (prompt-major) after the prefill, so samples or beams of one
    prompt share one prefill. Slots past a row's prompt hold padding that decoding overwrites.
    """
    batch, width = prompt.shape
    cache = init_cache(cfg, batch, width + max_new_tokens)
    valid = jnp.arange(width)[None, :] < prompt_lengths[:, None]  # padding takes no MoE capacity
    params = unstack_layers(params, cfg)  # the loop layout: see the module docstring
    logits, cache, _ = Transformer(loop_config(cfg)).apply({"params": params}, prompt, cache=cache, valid=valid)
    cache = with_lengths(cache, prompt_lengths)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    if repeats > 1:
        cache, last = jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), (cache, last))
    return cache, last


def decode_step(params: Any, cfg: ModelConfig, tokens: jax.Array,
                cache: tuple[KVCache, ...]) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """One token per row through the model: tokens [R] -> (next-token logits [R, V] fp32, updated caches).

    params: from `models.transformer.prepare_params` (or plain params in the loop layout): the loop's body is
    `model.apply`.
    """
    logits, cache, _ = Transformer(loop_config(cfg)).apply({"params": params}, tokens[:, None], cache=cache)
    return logits[:, 0], cache
