"""The panel kernel as `models/linear.py`'s products: dense and grouped, and weights packed for a decode loop.

    matmul(x, w)           x [M, K], w [K, N] -> [M, N]: the kernel forward, XLA matmuls for gradients
    grouped(x, w, sizes)   rows in group order, w [G, K, N], sizes [G] -> [M, N]: group g's rows x w[g]
    pack_weight(w, ...)    a `Packed` weight: the leaf as declared, beside its product matrix in panels

All float32. The kernel runs the forward products; gradients are XLA matmuls (the grouped weight gradient
on rows padded to blocks per group, as the dropless MoE layout does).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from models.kernels.cpu import panel_matmul as pm

# Rows per block of the grouped weight gradient (XLA has no ragged matmul on CPU): padding stays under
# one block per group.
GRAD_BLOCK = 128


@flax.struct.dataclass
class Packed:
    """A weight leaf prepared once for many products of a few rows (a decode loop).

    `w` is the leaf as the model declares it (first, so Flax's parameter shape check sees it, and the
    embedding lookup of a tied table reads it); `panels` is its product matrix [K, n] packed in 16-column
    panels, which `models.linear.linear` multiplies by instead of `w`.
    """

    w: jax.Array
    panels: jax.Array  # [ceil(n / 16), K, 16]
    n: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self) -> jnp.dtype:
        return self.w.dtype

    def astype(self, dtype: jnp.dtype | str) -> "Packed":
        """Packed weights are already in the compute dtype (float32): a cast is a no-op or a mistake."""
        if jnp.dtype(dtype) != self.w.dtype:
            raise TypeError(f"a packed {self.w.dtype} weight cannot be cast to {jnp.dtype(dtype)}")
        return self


def pack_weight(w: jax.Array, fan_in_dims: int = 1, transposed: bool = False) -> Packed:
    """w [*fan_in, *fan_out] (as `linear` takes it) -> Packed; transposed: w is [N, K] (a tied embedding
    table used as the LM head) and the product is x @ w.T."""
    k = w.shape[-1] if transposed else math.prod(w.shape[:fan_in_dims])
    matrix = w.reshape(-1, k).T if transposed else w.reshape(k, -1)
    return Packed(w=w, panels=pm.pack(matrix.astype(jnp.float32)), n=matrix.shape[1])


def packed_matmul(x: jax.Array, w: Packed) -> jax.Array:
    """x [M, K] -> [M, n]. Inference only (no gradient rule): the decode loop's products."""
    return pm.panel_matmul(x, w.panels, w.n)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return pm.panel_matmul(x, w, w.shape[1])


def _matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return matmul(x, w), (x, w)


def _matmul_bwd(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    return dy @ w.T, x.T @ dy


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def grouped(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    return pm.grouped_panel_matmul(x, w, sizes, w.shape[2])


def _grouped_fwd(x: jax.Array, w: jax.Array, sizes: jax.Array) -> tuple[jax.Array, tuple]:
    return grouped(x, w, sizes), (x, w, sizes)


def _grouped_bwd(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    x, w, sizes = residuals
    dx = grouped(dy, jnp.swapaxes(w, 1, 2), sizes)
    return dx, grouped_weight_grad(x, dy, sizes), None


grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_weight_grad(x: jax.Array, dy: jax.Array, sizes: jax.Array) -> jax.Array:
    """dw[g] = x_g^T dy_g: x [M, K], dy [M, N] rows in group order, sizes [G] -> [G, K, N].

    Each group's rows are placed at the start of whole blocks of GRAD_BLOCK rows (zeros after them),
    every block's product is one batched matmul, and blocks are summed into their group.
    """
    m, groups = x.shape[0], sizes.shape[0]
    block = max(1, min(GRAD_BLOCK, m // groups))
    blocks = (m + groups * (block - 1)) // block  # >= sum_g ceil(sizes_g / block)
    ends = jnp.cumsum(sizes)
    padded = -(-sizes // block) * block
    padded_ends = jnp.cumsum(padded)
    row = jnp.arange(m)
    group = jnp.searchsorted(ends, row, side="right")  # == groups for rows after the last group
    valid = group < groups
    group = jnp.minimum(group, groups - 1)
    # A row's place: its group's first padded slot plus its rank within the group.
    slot = jnp.where(valid, (padded_ends - padded)[group] + row - (ends - sizes)[group], blocks * block)
    xp = jnp.zeros((blocks * block, x.shape[1]), x.dtype).at[slot].set(x, mode="drop")
    dyp = jnp.zeros((blocks * block, dy.shape[1]), dy.dtype).at[slot].set(dy, mode="drop")
    per_block = jnp.einsum("brk,brn->bkn", xp.reshape(blocks, block, -1), dyp.reshape(blocks, block, -1))
    block_group = jnp.searchsorted(padded_ends, jnp.arange(blocks) * block, side="right")
    return jax.ops.segment_sum(per_block, block_group, num_segments=groups)
