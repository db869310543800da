"""Projections as one 2-D matmul: [tokens, fan_in] x [fan_in, fan_out]; experts as a grouped one.

Written as `einsum("btd,df->btf")`, a projection's weight gradient contracts two dims (batch and
length), and XLA:CPU then copies the [B*T, F] output gradient into a transposed layout before the
matmul: a strided copy per projection that took 12% of a d_model=512 train step. The same product on
tokens flattened to 2-D needs no copy (SwiGLU MLP forward + backward at 4096 tokens x 512 x 1536,
interleaved in one process: 510 ms as einsum, 395 ms flattened). The reshapes are free (row-major views)
and keep the sharding: the flattened token dim is split like the batch dim it leads with.

`impl` ("xla" or "cpu", `ModelConfig.matmul_impl`) picks who multiplies: XLA, or the CPU kernel
(`models/kernels/panel_matmul.py`, float32, single device), which packs the weight in 16-column panels
itself.
The kernel runs the forward products; gradients are XLA matmuls (the grouped weight gradient on rows
padded to blocks per group, as the dropless MoE layout does).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.kernels import panel_matmul as pm

# Rows per block of the grouped weight gradient (XLA has no ragged matmul on CPU): padding stays under
# one block per group.
GRAD_BLOCK = 128


def linear(x: jax.Array, w: jax.Array, fan_in_dims: int = 1, impl: str = "xla") -> jax.Array:
    """x: [..., *fan_in], w: [*fan_in, *fan_out] -> [..., *fan_out].

    fan_in_dims: how many trailing dims of x (leading dims of w) are contracted, e.g. 2 for an attention
    output projection [B, T, N, H] x [N, H, D].
    """
    lead, fan_in = x.shape[:x.ndim - fan_in_dims], w.shape[:fan_in_dims]
    assert x.shape[x.ndim - fan_in_dims:] == fan_in, (x.shape, w.shape)
    k = math.prod(fan_in)
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    y = _kernel_matmul(x2, w2) if impl == "cpu" else x2 @ w2
    return y.reshape(*lead, *w.shape[fan_in_dims:])


def grouped_linear(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """x: [M, K] rows in group order, w: [G, K, N], sizes: [G] rows per group (sum <= M) -> [M, N].

    Group g's rows times w[g]; rows after the last group are zero. By the CPU kernel (float32).
    """
    return _kernel_grouped(x, w, sizes.astype(jnp.int32))


@jax.custom_vjp
def _kernel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return pm.panel_matmul(x, w, w.shape[1])


def _kernel_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return _kernel_matmul(x, w), (x, w)


def _kernel_matmul_bwd(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    return dy @ w.T, x.T @ dy


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


@jax.custom_vjp
def _kernel_grouped(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    return pm.grouped_panel_matmul(x, w, sizes, w.shape[2])


def _kernel_grouped_fwd(x: jax.Array, w: jax.Array, sizes: jax.Array) -> tuple[jax.Array, tuple]:
    return _kernel_grouped(x, w, sizes), (x, w, sizes)


def _kernel_grouped_bwd(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    x, w, sizes = residuals
    dx = _kernel_grouped(dy, jnp.swapaxes(w, 1, 2), sizes)
    return dx, grouped_weight_grad(x, dy, sizes), None


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


_kernel_grouped.defvjp(_kernel_grouped_fwd, _kernel_grouped_bwd)
