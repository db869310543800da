"""Token embedding (optionally tied to the LM head) and absolute position embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.linear import linear, unprepared
from models.sharding import param_with_axes


class Embed(nn.Module):
    """Token ids -> vectors, and (when tied) vectors -> logits with the same table."""

    vocab_size: int
    d_model: int
    init_std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.table = self.param(
            "table", param_with_axes(nn.initializers.normal(self.init_std), ("vocab", "embed")),
            (self.vocab_size, self.d_model), self.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, T] int -> [B, T, D]."""
        return jnp.take(unprepared(self.table), tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, matmul_impl: str = "xla") -> jax.Array:
        """x: [B, T, D] -> logits [B, T, V] in fp32: the table as the LM head."""
        return linear(x, self.table.astype(self.dtype), impl=matmul_impl, transposed=True, out_dtype=jnp.float32)


class LearnedPositions(nn.Module):
    max_seq_len: int
    d_model: int
    init_std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        """positions: [B, T] -> [B, T, D]."""
        table = self.param(
            "table", param_with_axes(nn.initializers.normal(self.init_std), ("position", "embed")),
            (self.max_seq_len, self.d_model), self.param_dtype)
        return jnp.take(table, positions, axis=0)


def sinusoidal_positions(positions: jax.Array, d_model: int, max_timescale: float = 1e4) -> jax.Array:
    """Fixed sin/cos features (Vaswani et al. 2017): positions [B, T] -> [B, T, D] fp32."""
    half = d_model // 2
    timescales = max_timescale ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] / timescales
    features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(features, [(0, 0)] * (features.ndim - 1) + [(0, d_model - 2 * half)])
