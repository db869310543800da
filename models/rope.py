"""Rotary position embeddings (RoPE) with linear and NTK-style scaling for context extension.

Layout: the "rotate half" convention (pairs are (i, i + H/2)), as in GPT-NeoX and the Hugging Face
Llama family, so imported checkpoints need no permutation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: str = "none",
                             factor: float = 1.0) -> jax.Array:
    """Per-pair rotation speeds, [H // 2] fp32.

    linear: positions are divided by `factor` (position interpolation, Chen et al. 2023).
    ntk:    the base is stretched to theta * factor^(H / (H - 2)), so the slowest pair slows by
            `factor` while the fastest (local) pairs barely change ("NTK-aware" scaling).
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if scaling == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** exponents)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x: [B, T, heads, H] by its positions: [B, T]. Computed in fp32, returned in x.dtype."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
