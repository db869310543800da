"""Fused causal self-attention on CPU (`cpu_attention.cc`, an XLA FFI handler), float32, no cache.

    out, lse = cpu_causal_attention(q, k, v, window)   # q [B, T, N, H], k, v [B, T, K, H]

For queries and keys at positions 0..T-1 of each row (training, scoring, prefill): causal, with an
optional sliding window (0: off), grouped-query heads (N a multiple of K). `lse` [B, K, T * G] is each
query row's log-sum-exp of the scaled logits, rows t-major, the layout `models/causal_attention.py`'s
backward pass recomputes the probabilities from. The model reaches it with attention_impl="cpu".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.kernels.cpu_library import available, unavailable_reason

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
