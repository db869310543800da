"""Fused causal self-attention on CPU (`attention.cc`, an XLA FFI handler), float32, no cache.

    out, lse = cpu_causal_attention(q, k, v, window)   # q [B, T, N, H], k, v [B, T, K, H]
    out = fused_causal_attention(q, k, v, window)       # the same, differentiable

For queries and keys at positions 0..T-1 of each row (training, scoring, prefill): causal, with an
optional sliding window (0: off), grouped-query heads (N a multiple of K). `lse` [B, K, T * G] is each
query row's log-sum-exp of the scaled logits, rows t-major, the layout `models/blocked_attention.py`'s
backward pass recomputes the probabilities from. The model reaches it with attention_impl="cpu_fused".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.blocked_attention import BlockSpec, backward, block_spec, grouped, ungrouped
from models.kernels.cpu.library import available, unavailable_reason

TARGET = "llmf_causal_attention"


def cpu_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """q: [B, T, N, H]; k, v: [B, T, K, H], float32 -> (out [B, T, N, H], lse [B, K, T * N / K])."""
    if any(x.dtype != jnp.float32 for x in (q, k, v)):
        raise TypeError(f"cpu_attention: float32 only, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not available():
        raise RuntimeError(f"cpu_attention: the CPU kernels are unavailable: {unavailable_reason()}")
    b, t, n, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, k.shape[2], t * n // k.shape[2]),
                                                                            jnp.float32))
    return jax.ffi.ffi_call(TARGET, out)(q, k, v, window=int(window))


def fused_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int) -> jax.Array:
    """`models.blocked_attention.causal_attention` with the forward by the kernel: q [B, T, N, H]; k, v
    [B, T, K, H] -> [B, T, N, H]. The backward is the blocked path's, from the kernel's log-sum-exp."""
    return _fused(q, k, v, block_spec(q.shape[1], sliding_window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(q: jax.Array, k: jax.Array, v: jax.Array, spec: BlockSpec) -> jax.Array:
    return cpu_causal_attention(q, k, v, spec.window)[0]


def _fused_fwd(q: jax.Array, k: jax.Array, v: jax.Array, spec: BlockSpec) -> tuple[jax.Array, tuple]:
    out, lse = cpu_causal_attention(q, k, v, spec.window)
    return out, (q, k, v, out, lse)


def _fused_bwd(spec: BlockSpec, residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, out, lse = residuals
    t, kv_heads = q.shape[1], k.shape[2]
    d_q, d_k, d_v = backward(grouped(q, kv_heads), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                             grouped(out, kv_heads), lse, grouped(d_out, kv_heads), spec)
    return ungrouped(d_q, t), d_k.transpose(0, 2, 1, 3), d_v.transpose(0, 2, 1, 3)


_fused.defvjp(_fused_fwd, _fused_bwd)
