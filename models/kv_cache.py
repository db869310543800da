"""A preallocated KV cache: one pytree per layer, per-row lengths, jit- and donation-friendly.

Slot j of a row holds the key/value of that row's position j, so positions double as slot indices.
Rows of a batch can hold different lengths (ragged prompts): a write of T tokens goes to slots
[length, length + T) of each row, and attention masks slots at or beyond a row's length.
With a sliding window the cache still keeps every slot; the window is applied by the mask.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [B, S_max, K, H]
    v: jax.Array  # [B, S_max, K, H]
    lengths: jax.Array  # [B] int32: valid slots per row

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k_new: jax.Array, v_new: jax.Array) -> "KVCache":
        """Writes k_new, v_new: [B, T, K, H] at each row's current length; lengths += T.

        The caller guarantees length + T <= S_max (dynamic_update_slice would clamp silently).
        """

        def write(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (start, 0, 0))

        k = jax.vmap(write)(self.k, k_new, self.lengths)
        v = jax.vmap(write)(self.v, v_new, self.lengths)
        return KVCache(k=k, v=v, lengths=self.lengths + k_new.shape[1])


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None,
               dtype: str | jnp.dtype | None = None) -> tuple[KVCache, ...]:
    """Empty caches, one per layer, of shape [batch, max_len, K, H] (defaults: cfg.max_seq_len, cfg.dtype)."""
    max_len = max_len or cfg.max_seq_len
    shape = (batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return tuple(
        KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                lengths=jnp.zeros((batch,), jnp.int32))
        for _ in range(cfg.num_layers))


def with_lengths(caches: tuple[KVCache, ...], lengths: jax.Array) -> tuple[KVCache, ...]:
    """Sets every layer's per-row lengths, e.g. to the true prompt lengths after a padded prefill."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return tuple(c.replace(lengths=lengths) for c in caches)


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: str | jnp.dtype | None = None) -> int:
    """2 (K and V) x layers x batch x seq x kv_heads x head_dim x bytes per element."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.num_layers * batch * seq_len * cfg.num_kv_heads * cfg.resolved_head_dim * itemsize
