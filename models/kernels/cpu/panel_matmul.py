"""Rows times a weight in 16-column panels on CPU, dense or per expert group (`panel_matmul.cc`, XLA FFI).

    y = panel_matmul(x, w, n=N)                   # x [M, K], w [K, N] -> [M, N], float32
    y = panel_matmul(x, pack(w), n=N)             # the same, on a weight packed once (a decode loop)
    y = grouped_panel_matmul(x, w, sizes, n=N)    # rows in group order, w [G, K, N]: group g's rows x w[g]

Two uses. The decode step multiplies a handful of rows by weights that come from memory: XLA:CPU's
general matmul repacks the weight on every call (~3x a one-row product for four rows), while the
kernel streams panels packed once, before the loop (`linear.py`'s `Packed` weights, made by
`models.transformer.prepare_params`). A forward over many rows (`ModelConfig.matmul_impl="cpu_panel"`,
via `models/linear.py`) is compute-bound: the kernel packs a raw
weight itself, into a buffer it keeps, and runs 6-row x 16-column register tiles over blocks of rows;
the grouped form computes each expert's run of sorted rows with no padding, which XLA on CPU has no op
for (`jax.lax.ragged_dot` computes every group densely there). The library is built by `cpu_library`;
without it (`available()` False) callers keep XLA's matmul. `panel_matmul_reference` is the packed
product in jnp, for the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.kernels.cpu.library import available, unavailable_reason

PANEL = 16
TARGET = "llmf_panel_matmul"
GROUPED_TARGET = "llmf_grouped_panel_matmul"


def pack(w: jax.Array) -> jax.Array:
    """w [..., K, N] -> [..., ceil(N / 16), K, 16]: panel s holds columns 16s..16s+15 row after row,
    zero-padded. Leading dims (experts) are kept."""
    *lead, k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, panels * PANEL - n)])
    return jnp.swapaxes(w.reshape(*lead, k, panels, PANEL), -3, -2)


def panel_matmul(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """x [M, K] float32 times w -> [M, n] float32.

    w: raw [K, n] (packed inside the kernel, into a buffer it keeps between calls), or packed
    [ceil(n / 16), K, 16] from `pack` (for a weight used many times, e.g. in a decode loop).
    """
    _check(x, w)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w)


def grouped_panel_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, n: int) -> jax.Array:
    """x [M, K] float32 with rows in group order, sizes [G] (the rows of each group, summing to <= M),
    w raw [G, K, n] or packed [G, ceil(n / 16), K, 16] -> [M, n] float32: group g's rows times weight
    g; rows after the last group are zero (jax.lax.ragged_dot's contract)."""
    _check(x, w)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(GROUPED_TARGET, out)(x, w, sizes.astype(jnp.int32))


def _check(x: jax.Array, w: jax.Array) -> None:
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise TypeError(f"panel_matmul: float32 only, got x {x.dtype} and w {w.dtype}")
    if not available():
        raise RuntimeError(f"panel_matmul: the CPU kernel is unavailable: {unavailable_reason()}")


def panel_matmul_reference(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    return jnp.einsum("mk,skc->msc", x, packed).reshape(x.shape[0], -1)[:, :n]
