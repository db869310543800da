"""What the attention kernels share: the mask description, block ranges, padding, backend choice.

A mask is described, never materialised: query b, t may see key slot s iff
    t < T  and  s < kv_len[b]  and  q_seg[b, t] == kv_seg[b, s]
    and (not causal or kv_pos[b, s] <= q_pos[b, t])
    and (window == 0 or kv_pos[b, s] > q_pos[b, t] - window).
Kernels evaluate it per tile from the position/segment vectors. Which kv blocks a query block can see
at all is summarised up front in XLA (`MaskInputs`), so a kernel's loop visits only that range:
causal, windowed, ragged and packed masks all skip their empty blocks the same way.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Finite start for the running max: exp(MASK_VALUE - m) underflows to 0 where -inf - -inf would be NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_INT_MAX = int(np.iinfo(np.int32).max)
_INT_MIN = int(np.iinfo(np.int32).min)


def resolve_interpret(interpret: bool | None) -> bool:
    """None: interpret exactly when the default backend is CPU (Pallas only lowers for GPU/TPU)."""
    return jax.default_backend() == "cpu" if interpret is None else interpret


def check_tile(owner: str, name: str, value: int) -> None:
    """Triton tiles must be powers of two, and tl.dot needs at least 16 along each dimension."""
    if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
        raise ValueError(f"{owner}.{name}={value!r}: expected a power of two >= 16")


def check_launch(owner: str, num_warps: int, num_stages: int) -> None:
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{owner}.num_warps={num_warps!r}: expected one of 1, 2, 4, 8, 16")
    if not (isinstance(num_stages, int) and num_stages >= 1):
        raise ValueError(f"{owner}.num_stages={num_stages!r}: expected a positive integer")


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def fit_block(block: int, length: int) -> int:
    """A tile no longer than the sequence needs (short prefills would otherwise pad to a whole tile)."""
    return min(block, max(16, 1 << (length - 1).bit_length()))


def padded_head_dim(h: int) -> int:
    """Triton loads whole power-of-two tiles; zero features change neither q.k nor p.v."""
    return max(16, 1 << (h - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `axis` up to `size`; a no-op (no copy) when it is already that long."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static half of the mask description (hashable: a kernel parameter)."""

    causal: bool
    sliding_window: int
    q_len: int  # T before padding: rows at or beyond it are padding and see nothing

    def visible(self, q_idx: jax.Array, q_pos: jax.Array, q_seg: jax.Array, kv_idx: jax.Array,
                kv_pos: jax.Array, kv_seg: jax.Array, kv_len: jax.Array) -> jax.Array:
        """One tile of the mask: q_* [bq], kv_* [bk], kv_len scalar -> [bq, bk] bool."""
        ok = (q_idx[:, None] < self.q_len) & (kv_idx[None, :] < kv_len)
        ok &= q_seg[:, None] == kv_seg[None, :]
        if self.causal:
            ok &= kv_pos[None, :] <= q_pos[:, None]
        if self.sliding_window:
            ok &= kv_pos[None, :] > q_pos[:, None] - self.sliding_window
        return ok


class MaskInputs(NamedTuple):
    """The dynamic half, padded to whole blocks, plus the block ranges a kernel loops over."""

    q_pos: jax.Array  # [B, T_pad] int32
    q_seg: jax.Array  # [B, T_pad] int32
    kv_pos: jax.Array  # [B, S_pad] int32
    kv_seg: jax.Array  # [B, S_pad] int32
    kv_len: jax.Array  # [B] int32, at most S
    kv_lo: jax.Array  # [B, T_pad // block_q]: first kv block a query block sees
    kv_hi: jax.Array  # [B, T_pad // block_q]: one past the last (kv_lo == kv_hi: sees nothing)
    q_lo: jax.Array  # [B, S_pad // block_k]: first query block that sees a kv block
    q_hi: jax.Array  # [B, S_pad // block_k]


def _span(visible: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """[first, last + 1) of the True entries along `axis`; (0, 0) where there are none."""
    n = visible.shape[axis]
    first = jnp.argmax(visible, axis)
    last = n - 1 - jnp.argmax(jnp.flip(visible, axis), axis)
    seen = visible.any(axis)
    return (jnp.where(seen, first, 0).astype(jnp.int32),
            jnp.where(seen, last + 1, 0).astype(jnp.int32))


def _block_bounds(x: jax.Array, valid: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """[B, L] -> per-block min and max over the valid entries, [B, L // block] each."""
    x = x.reshape(x.shape[0], -1, block)
    valid = valid.reshape(x.shape)
    return jnp.where(valid, x, _INT_MAX).min(-1), jnp.where(valid, x, _INT_MIN).max(-1)


def mask_inputs(spec: MaskSpec, q_pos: jax.Array, kv_pos: jax.Array, kv_len: jax.Array, q_seg: jax.Array,
                kv_seg: jax.Array, t_pad: int, s_pad: int, block_q: int, block_k: int) -> MaskInputs:
    """Pads the [B, T] / [B, S] descriptions to whole blocks and finds each block's range.

    A block pair is kept when the per-block [min, max] bounds of positions and segment ids could
    satisfy the mask. The bounds are necessary conditions, so the ranges never drop a visible key
    (blocks inside a range that turn out empty are masked element-wise); they need no ordering.
    """
    s = kv_pos.shape[1]
    kv_len = jnp.minimum(kv_len.astype(jnp.int32), s)
    q_pos, q_seg = pad_axis(q_pos, 1, t_pad), pad_axis(q_seg, 1, t_pad)
    kv_pos, kv_seg = pad_axis(kv_pos, 1, s_pad), pad_axis(kv_seg, 1, s_pad)
    q_valid = jnp.broadcast_to(jnp.arange(t_pad) < spec.q_len, q_pos.shape)
    kv_valid = jnp.arange(s_pad)[None, :] < kv_len[:, None]

    qp_lo, qp_hi = _block_bounds(q_pos, q_valid, block_q)
    qs_lo, qs_hi = _block_bounds(q_seg, q_valid, block_q)
    kp_lo, kp_hi = _block_bounds(kv_pos, kv_valid, block_k)
    ks_lo, ks_hi = _block_bounds(kv_seg, kv_valid, block_k)
    q_any = q_valid.reshape(q_valid.shape[0], -1, block_q).any(-1)
    kv_any = kv_valid.reshape(kv_valid.shape[0], -1, block_k).any(-1)

    def q_(x: jax.Array) -> jax.Array:
        return x[:, :, None]

    def kv_(x: jax.Array) -> jax.Array:
        return x[:, None, :]

    visible = q_(q_any) & kv_(kv_any) & (q_(qs_lo) <= kv_(ks_hi)) & (kv_(ks_lo) <= q_(qs_hi))
    if spec.causal:
        visible &= kv_(kp_lo) <= q_(qp_hi)
    if spec.sliding_window:
        visible &= kv_(kp_hi) > q_(qp_lo) - spec.sliding_window
    kv_lo, kv_hi = _span(visible, 2)  # visible: [B, nq, nk]
    q_lo, q_hi = _span(visible, 1)
    return MaskInputs(q_pos, q_seg, kv_pos, kv_seg, kv_len, kv_lo, kv_hi, q_lo, q_hi)
