"""Next-token cross-entropy through the LM head, in chunks of positions, without storing the logits.

The training loss needs the logits only to reduce them: per token, logsumexp minus the target's logit.
The full [B, T, V] fp32 logits (and their softmax and gradient, as large) would be written to memory
and read back several times. Here the head is applied to a chunk of positions at a time, and the
chunk's gradients (d hidden = (softmax - onehot) W^T, d W += hidden^T (softmax - onehot)) are
computed right away, while its logits are still in cache: a custom VJP whose backward only scales
them by the incoming cotangent. The matmul FLOPs are those of plain autodiff (nothing is recomputed);
what is saved is memory traffic and the step's temporary memory.

Chunks cut the sequence axis, never the batch axis, so a batch split over devices stays split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK_TOKENS = 512  # tokens (batch x positions) per chunk: its [tokens, V] fp32 logits stay a few MB


def _chunks(x: jax.Array, targets: jax.Array, chunk_tokens: int) -> tuple[jax.Array, ...]:
    """x: [B, T, D], targets: [B, T] -> per chunk of c positions: x [n, B, c, D], x transposed
    [n, D, B, c] (so that d W = x^T dlogits needs no copy per chunk), targets [n, B, c], valid [n, B, c].

    T is padded to whole chunks; padded positions and negative targets (context only, see `split_targets`)
    are invalid: they add no loss and no gradient.
    """
    b, t, d = x.shape
    c = max(1, min(t, chunk_tokens // b))
    n = -(-t // c)
    x = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0))).reshape(b, n, c, d)
    targets = jnp.pad(targets, ((0, 0), (0, n * c - t)), constant_values=-1).reshape(b, n, c).transpose(1, 0, 2)
    valid = targets >= 0
    return x.transpose(1, 0, 2, 3), x.transpose(1, 3, 0, 2), jnp.where(valid, targets, 0), valid


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_nll_sum(x: jax.Array, w: jax.Array, targets: jax.Array, chunk_tokens: int = CHUNK_TOKENS) -> jax.Array:
    """Summed next-token NLL of `targets` under the logits x @ w, chunk by chunk: [] fp32.

    x: [B, T, D] final hidden states; w: [D, V] head weight, both in the compute dtype; targets: [B, T],
    a negative target adding nothing (a context-only position).
    """
    return _forward(x, w, targets, chunk_tokens)[0]


def _forward(x: jax.Array, w: jax.Array, targets: jax.Array,
             chunk_tokens: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(summed NLL, (d NLL / d x, d NLL / d w))."""
    b, t, d = x.shape

    def step(dw: jax.Array, chunk: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        xc, xc_t, tc, valid = chunk  # [B, c, D], [D, B, c], [B, c], [B, c]
        logits = jnp.einsum("bcd,dv->bcv", xc, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        nll = jnp.sum(jnp.where(valid, lse - picked, 0.0))
        dlogits = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(tc, w.shape[1], dtype=jnp.float32)
        dlogits = jnp.where(valid[..., None], dlogits, 0.0).astype(x.dtype)
        dx = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("dbc,bcv->dv", xc_t, dlogits, preferred_element_type=jnp.float32)
        return dw, (nll, dx)

    dw, (nll, dx) = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), _chunks(x, targets, chunk_tokens))
    dx = dx.transpose(1, 0, 2, 3).reshape(b, -1, d)[:, :t]
    return jnp.sum(nll), (dx.astype(x.dtype), dw.astype(w.dtype))


def _backward(chunk_tokens: int, grads: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    """The gradients were computed in the forward pass; scaling them by the cotangent g is the chain rule."""
    del chunk_tokens
    dx, dw = grads
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None


head_nll_sum.defvjp(_forward, _backward)
