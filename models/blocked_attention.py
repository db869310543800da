"""Causal self-attention over positions 0..T-1 (no cache), skipping the masked blocks, in plain jnp.

When query and key positions are both 0..T-1 in every row, the mask is static, so the queries are
cut into blocks and each block multiplies only the keys it can see (up to its last query, from its
first query's window start): about half the work of the full [T, T] score matrix for causal
attention, less with a sliding window. The backward pass recomputes each block's probabilities from
the saved log-sum-exp (as flash attention does) instead of storing them: 7 matmuls instead of 6, but
the saved scores, and the memory traffic to write and read them back, are gone.

Layout: each kv head's G query heads are stacked into rows t-major, [B, K, T * G, H] (`grouped`), so
the scores are one plain batched matmul per kv head (about 3x faster on CPU than a 5-D einsum with G
as its own axis) and a block of queries is a contiguous run of rows.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp


# Query positions per block: small blocks skip more of the masked triangle and keep a block's scores
# in cache; MAX_QUERY_BLOCKS bounds the unrolled program for long sequences.
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 16


def grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, T * G, H]: each kv head's G query heads stacked into rows, t-major."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, h)


def ungrouped(out: jax.Array, t: int) -> jax.Array:
    """The inverse of `grouped`: [B, K, T * G, H] -> [B, T, N, H]."""
    b, kv_heads, rows, h = out.shape
    return out.reshape(b, kv_heads, t, rows // t, h).transpose(0, 2, 1, 3, 4).reshape(b, t, -1, h)


class BlockSpec(NamedTuple):
    """The static description of the blocks (hashable: a non-differentiable custom_vjp argument)."""

    window: int  # 0: full causal
    block: int  # query positions per block

    def blocks(self, t: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, first): queries [start, end) see keys [first, end)."""
        for start in range(0, t, self.block):
            first = max(0, start - self.window + 1) if self.window else 0
            yield start, min(start + self.block, t), first


def block_spec(t: int, sliding_window: int) -> BlockSpec:
    return BlockSpec(sliding_window, max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS)))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int) -> jax.Array:
    """q: [B, T, N, H]; k, v: [B, T, K, H] -> [B, T, N, H], fp32 logits and softmax.

    Equals masked attention with q and kv positions 0..T-1 and no cache. Only the caller knows that
    the positions are 0..T-1 (the model passes it down): this is never decided from values.
    """
    t, kv_heads = q.shape[1], k.shape[2]
    out = _blocked(grouped(q, kv_heads), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                   block_spec(t, sliding_window))
    return ungrouped(out, t)


def _masked_logits(q: jax.Array, k: jax.Array, start: int, end: int, first: int, window: int) -> jax.Array:
    """Block scores: q [B, K, c * G, H] (queries start..end-1), k [B, K, s, H] (keys first..end-1)
    -> fp32 [B, K, c, G, s], scaled, -inf where masked."""
    b, kv_heads, rows, h = q.shape
    c = end - start
    logits = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    query_pos = jnp.arange(start, end)[:, None, None]
    key_pos = jnp.arange(first, end)[None, None, :]
    mask = key_pos <= query_pos
    if window:
        mask &= key_pos > query_pos - window
    return jnp.where(mask, logits.reshape(b, kv_heads, c, rows // c, end - first), -jnp.inf)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, spec: BlockSpec) -> tuple[jax.Array, jax.Array]:
    """q: [B, K, T * G, H]; k, v: [B, K, T, H] -> (out like q, log-sum-exp of each row's logits [B, K, T * G])."""
    b, kv_heads, rows, _ = q.shape
    g = rows // k.shape[2]
    outs, lses = [], []
    for start, end, first in spec.blocks(k.shape[2]):
        logits = _masked_logits(q[:, :, start * g:end * g], k[:, :, first:end], start, end, first, spec.window)
        peak = jnp.max(logits, axis=-1, keepdims=True)  # finite: every query sees itself
        weights = jnp.exp(logits - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        probs = (weights / total).astype(v.dtype).reshape(b, kv_heads, -1, end - first)
        outs.append(jnp.einsum("bkqs,bksh->bkqh", probs, v[:, :, first:end]))
        lses.append((peak + jnp.log(total)).reshape(b, kv_heads, -1))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
              spec: BlockSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of `_forward`'s out w.r.t. q, k, v, with each block's probabilities recomputed."""
    b, kv_heads, rows, h = q.shape
    g = rows // k.shape[2]
    # d logits = P * (dP - rowsum(dO * O)), the softmax Jacobian written with the output.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    d_q = []
    d_k, d_v = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for start, end, first in spec.blocks(k.shape[2]):
        rows_ = slice(start * g, end * g)
        q_b, k_b, v_b, d_out_b = q[:, :, rows_], k[:, :, first:end], v[:, :, first:end], d_out[:, :, rows_]
        logits = _masked_logits(q_b, k_b, start, end, first, spec.window)
        probs = jnp.exp(logits - lse[:, :, rows_].reshape(logits.shape[:4] + (1,)))
        probs = probs.reshape(b, kv_heads, -1, end - first)
        d_v = d_v.at[:, :, first:end].add(
            jnp.einsum("bkqs,bkqh->bksh", probs.astype(d_out.dtype), d_out_b, preferred_element_type=jnp.float32))
        d_probs = jnp.einsum("bkqh,bksh->bkqs", d_out_b, v_b, preferred_element_type=jnp.float32)
        d_logits = (probs * (d_probs - delta[:, :, rows_, None]) * (h ** -0.5)).astype(q.dtype)
        d_q.append(jnp.einsum("bkqs,bksh->bkqh", d_logits, k_b))
        d_k = d_k.at[:, :, first:end].add(
            jnp.einsum("bkqs,bkqh->bksh", d_logits, q_b, preferred_element_type=jnp.float32))
    return jnp.concatenate(d_q, axis=2), d_k.astype(k.dtype), d_v.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q: jax.Array, k: jax.Array, v: jax.Array, spec: BlockSpec) -> jax.Array:
    """Grouped q: [B, K, T * G, H]; k, v: [B, K, T, H] -> [B, K, T * G, H]."""
    return _forward(q, k, v, spec)[0]


def _blocked_fwd(q: jax.Array, k: jax.Array, v: jax.Array, spec: BlockSpec) -> tuple[jax.Array, tuple]:
    out, lse = _forward(q, k, v, spec)
    return out, (q, k, v, out, lse)


def _blocked_bwd(spec: BlockSpec, residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return backward(*residuals, d_out, spec)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
