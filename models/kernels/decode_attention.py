"""Decode attention: one new query token per row over a KV cache, split-K (flash-decoding).

    out = decode_attention(q, k_cache, v_cache, kv_lengths, q_positions, sliding_window=0)

q: [B, N, H]; k, v: [B, S, K, H], slot s holding position s (the layout of `models.kv_cache`);
kv_lengths: [B] valid slots per row; q_positions: [B], default kv_lengths - 1 (the token just
appended). Slot s is visible iff s < kv_lengths[b], s <= q_positions[b] and, with a window w,
s > q_positions[b] - w. A row that sees nothing gets zeros.

One query token leaves a single row of work per head, far too little to fill a GPU with one program
per (row, head). So the cache is split along S: program (split, kv head, row) streams its share of
the visible blocks once, for all G query heads of the kv head together (a [G, H] tile, GQA-aware:
each K/V byte is read once, not G times), and writes an unnormalised partial output with its running
max and normaliser. A small XLA step rescales and sums the partials, as the online softmax would.
Blocks beyond a row's length or before its window are never loaded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from models.kernels.mask import (MASK_VALUE, check_launch, check_tile, fit_block, pad_axis, padded_head_dim,
                                   resolve_interpret, round_up)
from models.kernels.flash_attention import flash_attention_reference


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """block_k: slots per tile (a power of two >= 16); num_splits: programs along S per (row, kv head).

    Splits beyond the number of blocks are dropped. A cache length that is a multiple of block_k
    avoids padding (a copy of the cache) on every call.
    """

    block_k: int = 128
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_tile("DecodeBlockSizes", "block_k", self.block_k)
        if not (isinstance(self.num_splits, int) and self.num_splits >= 1):
            raise ValueError(f"DecodeBlockSizes.num_splits={self.num_splits!r}: expected a positive integer")
        check_launch("DecodeBlockSizes", self.num_warps, self.num_stages)


def _decode_kernel(kv_len_ref, q_pos_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, sm_scale: float,
                   sliding_window: int, block_k: int, blocks_per_split: int):
    # kv_len_ref, q_pos_ref: [] int32; q_ref: [G_pad, H] (the query heads of this kv head)
    # k_ref, v_ref: [S_pad, H]; o_ref: [G_pad, H] fp32 unnormalised; m_ref, l_ref: [G_pad] fp32
    groups, head_dim = q_ref.shape
    q, q_pos = q_ref[...], q_pos_ref[...]
    end = jnp.minimum(kv_len_ref[...], q_pos + 1)  # slots >= end are past the row's length or in the future
    start = jnp.maximum(q_pos - sliding_window + 1, 0) if sliding_window else 0
    first = pl.program_id(0) * blocks_per_split
    lo = jnp.maximum(first, start // block_k)
    hi = jnp.minimum(first + blocks_per_split, (end + block_k - 1) // block_k)

    def step(j, carry):
        acc, m, l = carry
        cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        idx = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        ok = (idx >= start) & (idx < end)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.where(ok[None, :], s * sm_scale, -jnp.inf)  # [G_pad, bk]
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l * alpha + p.sum(axis=1)

    init = (jnp.zeros((groups, head_dim), jnp.float32), jnp.full((groups,), MASK_VALUE, jnp.float32),
            jnp.zeros((groups,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo, hi, step, init)
    o_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _combine(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Partials o [B, K, P, G, H], m, l [B, K, P, G] -> [B, K, G, H]; rows that saw nothing -> 0."""
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # an empty split has l = 0 and o = 0: no effect
    total = (weight * l).sum(axis=2)
    out = (weight[..., None] * o).sum(axis=2)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]


@functools.partial(jax.jit, static_argnames=("sliding_window", "sm_scale", "block_sizes", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                     q_positions: jax.Array | None = None, *, sliding_window: int = 0, sm_scale: float | None = None,
                     block_sizes: DecodeBlockSizes = DecodeBlockSizes(),
                     interpret: bool | None = None) -> jax.Array:
    """q: [B, N, H], k, v: [B, S, K, H], kv_lengths: [B], q_positions: [B] -> [B, N, H] in q's dtype.

    sm_scale defaults to H ** -0.5; interpret=None interprets exactly when the default backend is CPU.
    """
    if q.ndim != 3 or k.ndim != 4:
        raise ValueError(f"decode_attention: expected q [B, N, H] and k, v [B, S, K, H]; got q {q.shape}, "
                         f"k {k.shape}")
    (b, n, h), (s, kv_heads) = q.shape, k.shape[1:3]
    if v.shape != k.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"decode_attention: k and v must be [B={b}, S, K, H={h}] and equal; got k {k.shape}, "
                         f"v {v.shape}")
    if n % kv_heads:
        raise ValueError(f"decode_attention: query heads N={n} must be a multiple of kv heads K={kv_heads}")
    if not (q.dtype == k.dtype == v.dtype and jnp.issubdtype(q.dtype, jnp.floating)):
        raise ValueError(f"decode_attention: q, k, v need one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_lengths.shape != (b,) or (q_positions is not None and q_positions.shape != (b,)):
        raise ValueError(f"decode_attention: kv_lengths and q_positions must be [B={b}]; got "
                         f"{kv_lengths.shape}, {None if q_positions is None else q_positions.shape}")
    if sliding_window < 0:
        raise ValueError(f"decode_attention: sliding_window={sliding_window!r}: expected >= 0")
    kv_len = jnp.minimum(kv_lengths.astype(jnp.int32), s)
    q_pos = (kv_lengths - 1 if q_positions is None else q_positions).astype(jnp.int32)

    bk = fit_block(block_sizes.block_k, s)
    s_pad, h_pad, group = round_up(s, bk), padded_head_dim(h), n // kv_heads
    g_pad = padded_head_dim(group)  # tl.dot needs >= 16 rows: pad the group with zero queries
    num_blocks = s_pad // bk
    blocks_per_split = -(-num_blocks // min(block_sizes.num_splits, num_blocks))
    splits = -(-num_blocks // blocks_per_split)
    qg = pad_axis(pad_axis(q.reshape(b, kv_heads, group, h), 2, g_pad), 3, h_pad)
    k, v = (pad_axis(pad_axis(x, 1, s_pad), 3, h_pad) for x in (k, v))

    per_row = pl.BlockSpec((None,), lambda p, hk, bb: (bb,))
    cache = pl.BlockSpec((None, s_pad, None, h_pad), lambda p, hk, bb: (bb, 0, hk, 0))
    stat = pl.BlockSpec((None, None, None, g_pad), lambda p, hk, bb: (bb, hk, p, 0))
    o, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, sm_scale=h ** -0.5 if sm_scale is None else float(sm_scale),
                          sliding_window=sliding_window, block_k=bk, blocks_per_split=blocks_per_split),
        grid=(splits, kv_heads, b),
        in_specs=[per_row, per_row, pl.BlockSpec((None, None, g_pad, h_pad), lambda p, hk, bb: (bb, hk, 0, 0)),
                  cache, cache],
        out_specs=[pl.BlockSpec((None, None, None, g_pad, h_pad), lambda p, hk, bb: (bb, hk, p, 0, 0)), stat, stat],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, g_pad, h_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, g_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, g_pad), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=resolve_interpret(interpret), name="decode_attention",
    )(kv_len, q_pos, qg, k, v)
    return _combine(o, m, l)[:, :, :group, :h].reshape(b, n, h).astype(q.dtype)


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array,
                               q_positions: jax.Array | None = None, *, sliding_window: int = 0,
                               sm_scale: float | None = None) -> jax.Array:
    """The same contract in plain jnp: one causal query per row at q_positions over slots = positions."""
    q_positions = kv_lengths - 1 if q_positions is None else q_positions
    return flash_attention_reference(q[:, None], k, v, q_positions[:, None], None, kv_lengths, causal=True,
                                     sliding_window=sliding_window, sm_scale=sm_scale)[:, 0]
