"""Metric helpers shared by training and the studies (all in fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def perplexity(mean_nll: float | jax.Array) -> float | jax.Array:
    """exp of the mean per-token negative log-likelihood (nats)."""
    return np.exp(mean_nll) if isinstance(mean_nll, float) else jnp.exp(mean_nll)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood: logits [..., V], targets [...] int -> [...] fp32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis, from unnormalised logits: [..., V] -> [...]."""
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine of the angle between a and b along the last axis: [..., D] -> [...]."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)
