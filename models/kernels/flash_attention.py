"""Flash attention: blocked attention with online softmax, forward and backward, as Pallas kernels.

    out = flash_attention(q, k, v, q_positions, kv_positions, kv_lengths, q_segment_ids, kv_segment_ids,
                          causal=True, sliding_window=0)

q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 (MHA, GQA, MQA): query head n reads kv head
n // G, so K/V are never repeated. The mask is the one described in `models.kernels.mask`;
positions default to arange (causal is then top-left aligned, as in `jax.nn.dot_product_attention`),
kv_lengths to S, segment ids to a single segment. A query that sees no key gets zeros.

Forward: one program per (query block, query head, batch row) keeps its [block_q, H] output, running
max and normaliser in registers and loops over the kv blocks in its precomputed range. Backward
(FlashAttention-2): dQ the same way; dK/dV one program per (kv block, kv head, batch row) loops over
the G query heads of its group and the query blocks in range, so GQA needs no atomics.
T and S need not be block multiples: the wrapper pads to whole blocks and the mask hides the padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from models.kernels.mask import (MASK_VALUE, MaskInputs, MaskSpec, check_launch, check_tile, fit_block,
                                   mask_inputs, pad_axis, padded_head_dim, resolve_interpret, round_up)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) and Triton launch parameters (ignored when interpreting)."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            check_tile("BlockSizes", name, getattr(self, name))
        check_launch("BlockSizes", self.num_warps, self.num_stages)


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: MaskSpec
    sm_scale: float
    block_sizes: BlockSizes
    interpret: bool


def _dot(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
    """2-D matmul over the given axes with fp32 accumulation (lowers to tl.dot)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _iota(n: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _fwd_kernel(kv_lo_ref, kv_hi_ref, kv_len_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
                q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec: MaskSpec, sm_scale: float, block_k: int):
    # kv_lo_ref, kv_hi_ref, kv_len_ref: [] int32; q_pos_ref, q_seg_ref: [bq]; kv_pos_ref, kv_seg_ref: [S_pad]
    # q_ref: [bq, H]; k_ref, v_ref: [S_pad, H]; o_ref: [bq, H]; lse_ref: [bq] fp32
    block_q, head_dim = q_ref.shape
    q_idx = pl.program_id(0) * block_q + _iota(block_q)
    q, q_pos, q_seg, kv_len = q_ref[...], q_pos_ref[...], q_seg_ref[...], kv_len_ref[...]

    def step(j, carry):
        acc, m, l = carry
        cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        ok = spec.visible(q_idx, q_pos, q_seg, j * block_k + _iota(block_k), kv_pos_ref[cols],
                          kv_seg_ref[cols], kv_len)
        s = jnp.where(ok, _dot(q, k, 1, 1) * sm_scale, -jnp.inf)  # [bq, bk]
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
        return acc, m_new, l * alpha + p.sum(axis=1)

    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(kv_lo_ref[...], kv_hi_ref[...], step, init)
    empty = l == 0.0  # saw no key: output zeros, and lse = +inf makes every backward p exactly 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l))


def _dq_kernel(kv_lo_ref, kv_hi_ref, kv_len_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, spec: MaskSpec, sm_scale: float,
               block_k: int):
    # As _fwd_kernel, plus do_ref: [bq, H]; lse_ref, delta_ref: [bq] fp32; dq_ref: [bq, H]
    block_q, head_dim = q_ref.shape
    q_idx = pl.program_id(0) * block_q + _iota(block_q)
    q, do, q_pos, q_seg = q_ref[...], do_ref[...], q_pos_ref[...], q_seg_ref[...]
    lse, delta, kv_len = lse_ref[...], delta_ref[...], kv_len_ref[...]

    def step(j, dq):
        cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        ok = spec.visible(q_idx, q_pos, q_seg, j * block_k + _iota(block_k), kv_pos_ref[cols],
                          kv_seg_ref[cols], kv_len)
        p = jnp.exp(jnp.where(ok, _dot(q, k, 1, 1) * sm_scale, -jnp.inf) - lse[:, None])
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = jax.lax.fori_loop(kv_lo_ref[...], kv_hi_ref[...], step, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, kv_len_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec: MaskSpec,
                sm_scale: float, block_q: int):
    # q_lo_ref, q_hi_ref, kv_len_ref: [] int32; q_pos_ref, q_seg_ref: [T_pad]; kv_pos_ref, kv_seg_ref: [bk]
    # q_ref, do_ref: [T_pad, G, H] (the query heads of this kv head); k_ref, v_ref: [bk, H]
    # lse_ref, delta_ref: [G, T_pad] fp32; dk_ref, dv_ref: [bk, H]
    block_k, head_dim = k_ref.shape
    kv_idx = pl.program_id(0) * block_k + _iota(block_k)
    k, v, kv_pos, kv_seg, kv_len = k_ref[...], v_ref[...], kv_pos_ref[...], kv_seg_ref[...], kv_len_ref[...]
    q_lo, q_hi = q_lo_ref[...], q_hi_ref[...]

    def head(g, carry):
        def step(i, carry):
            dk, dv = carry
            rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q, do, lse, delta = q_ref[rows, g, :], do_ref[rows, g, :], lse_ref[g, rows], delta_ref[g, rows]
            ok = spec.visible(i * block_q + _iota(block_q), q_pos_ref[rows], q_seg_ref[rows], kv_idx, kv_pos,
                              kv_seg, kv_len)
            p = jnp.exp(jnp.where(ok, _dot(q, k, 1, 1) * sm_scale, -jnp.inf) - lse[:, None])  # [bq, bk]
            ds = p * (_dot(do, v, 1, 1) - delta[:, None])
            return dk + _dot(ds.astype(q.dtype), q, 0, 0), dv + _dot(p.astype(do.dtype), do, 0, 0)

        return jax.lax.fori_loop(q_lo, q_hi, step, carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(bs: BlockSizes) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _pad_heads(x: jax.Array, length: int) -> jax.Array:
    """[B, L, heads, H] -> [B, length, heads, H_pad], zero-padded."""
    return pad_axis(pad_axis(x, 1, length), 3, padded_head_dim(x.shape[3]))


def _forward(st: _Static, q, k, v, q_pos, kv_pos, kv_len, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
    """-> (out [B, T, N, H], lse [B, N, T] fp32; +inf where a query sees no key)."""
    (b, t, n, h), (s, kv_heads) = q.shape, k.shape[1:3]
    bq, bk = fit_block(st.block_sizes.block_q, t), fit_block(st.block_sizes.block_k, s)
    t_pad, s_pad, h_pad, group = round_up(t, bq), round_up(s, bk), padded_head_dim(h), n // kv_heads
    mi = mask_inputs(st.spec, q_pos, kv_pos, kv_len, q_seg, kv_seg, t_pad, s_pad, bq, bk)
    per_block = pl.BlockSpec((None, None), lambda i, hd, bb: (bb, i))
    per_row = pl.BlockSpec((None,), lambda i, hd, bb: (bb,))
    q_vec = pl.BlockSpec((None, bq), lambda i, hd, bb: (bb, i))
    kv_vec = pl.BlockSpec((None, s_pad), lambda i, hd, bb: (bb, 0))
    q_tile = pl.BlockSpec((None, bq, None, h_pad), lambda i, hd, bb: (bb, i, hd, 0))
    kv_all = pl.BlockSpec((None, s_pad, None, h_pad), lambda i, hd, bb: (bb, 0, hd // group, 0))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=st.spec, sm_scale=st.sm_scale, block_k=bk),
        grid=(t_pad // bq, n, b),  # query blocks fastest: neighbouring programs share one head's K/V in L2
        in_specs=[per_block, per_block, per_row, q_vec, q_vec, kv_vec, kv_vec, q_tile, kv_all, kv_all],
        out_specs=[q_tile, pl.BlockSpec((None, None, bq), lambda i, hd, bb: (bb, hd, i))],
        out_shape=[jax.ShapeDtypeStruct((b, t_pad, n, h_pad), q.dtype),
                   jax.ShapeDtypeStruct((b, n, t_pad), jnp.float32)],
        compiler_params=_compiler_params(st.block_sizes), interpret=st.interpret, name="flash_attention_fwd",
    )(mi.kv_lo, mi.kv_hi, mi.kv_len, mi.q_pos, mi.q_seg, mi.kv_pos, mi.kv_seg,
      _pad_heads(q, t_pad), _pad_heads(k, s_pad), _pad_heads(v, s_pad))
    return out[:, :t, :, :h], lse[:, :, :t]


def _backward(st: _Static, residuals, do: jax.Array):
    q, k, v, out, lse, q_pos, kv_pos, kv_len, q_seg, kv_seg = residuals
    (b, t, n, h), (s, kv_heads) = q.shape, k.shape[1:3]
    bq, bk = fit_block(st.block_sizes.block_q_bwd, t), fit_block(st.block_sizes.block_k_bwd, s)
    t_pad, s_pad, h_pad, group = round_up(t, bq), round_up(s, bk), padded_head_dim(h), n // kv_heads
    mi: MaskInputs = mask_inputs(st.spec, q_pos, kv_pos, kv_len, q_seg, kv_seg, t_pad, s_pad, bq, bk)
    # delta_t = sum_s p_ts dp_ts = do_t . out_t: one cheap XLA reduction instead of a third kernel.
    delta = pad_axis(jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32), do.astype(jnp.float32)), 2, t_pad)
    lse = pad_axis(lse, 2, t_pad)
    qp, dop, kp, vp = _pad_heads(q, t_pad), _pad_heads(do, t_pad), _pad_heads(k, s_pad), _pad_heads(v, s_pad)
    params = dict(compiler_params=_compiler_params(st.block_sizes), interpret=st.interpret)
    masks = (mi.kv_len, mi.q_pos, mi.q_seg, mi.kv_pos, mi.kv_seg)

    # dQ: grid (query block, query head, batch row), as the forward pass.
    per_block = pl.BlockSpec((None, None), lambda i, hd, bb: (bb, i))
    q_vec = pl.BlockSpec((None, bq), lambda i, hd, bb: (bb, i))
    kv_vec = pl.BlockSpec((None, s_pad), lambda i, hd, bb: (bb, 0))
    q_tile = pl.BlockSpec((None, bq, None, h_pad), lambda i, hd, bb: (bb, i, hd, 0))
    kv_all = pl.BlockSpec((None, s_pad, None, h_pad), lambda i, hd, bb: (bb, 0, hd // group, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda i, hd, bb: (bb, hd, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=st.spec, sm_scale=st.sm_scale, block_k=bk),
        grid=(t_pad // bq, n, b),
        in_specs=[per_block, per_block, pl.BlockSpec((None,), lambda i, hd, bb: (bb,)), q_vec, q_vec, kv_vec,
                  kv_vec, q_tile, kv_all, kv_all, q_tile, row_stat, row_stat],
        out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype), name="flash_attention_dq", **params,
    )(mi.kv_lo, mi.kv_hi, *masks, qp, kp, vp, dop, lse, delta)

    # dK, dV: grid (kv block, kv head, batch row); each program owns its tile, so no atomics.
    per_block = pl.BlockSpec((None, None), lambda j, hk, bb: (bb, j))
    q_vec = pl.BlockSpec((None, t_pad), lambda j, hk, bb: (bb, 0))
    kv_vec = pl.BlockSpec((None, bk), lambda j, hk, bb: (bb, j))
    q_group = pl.BlockSpec((None, t_pad, group, h_pad), lambda j, hk, bb: (bb, 0, hk, 0))
    kv_tile = pl.BlockSpec((None, bk, None, h_pad), lambda j, hk, bb: (bb, j, hk, 0))
    group_stat = pl.BlockSpec((None, group, t_pad), lambda j, hk, bb: (bb, hk, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=st.spec, sm_scale=st.sm_scale, block_q=bq),
        grid=(s_pad // bk, kv_heads, b),
        in_specs=[per_block, per_block, pl.BlockSpec((None,), lambda j, hk, bb: (bb,)), q_vec, q_vec, kv_vec,
                  kv_vec, q_group, kv_tile, kv_tile, q_group, group_stat, group_stat],
        out_specs=[kv_tile, kv_tile], out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype)] * 2,
        name="flash_attention_dkv", **params,
    )(mi.q_lo, mi.q_hi, *masks, qp, kp, vp, dop, lse, delta)
    return dq[:, :t, :, :h], dk[:, :s, :, :h], dv[:, :s, :, :h]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, q_pos, kv_pos, kv_len, q_seg, kv_seg) -> jax.Array:
    return _forward(st, q, k, v, q_pos, kv_pos, kv_len, q_seg, kv_seg)[0]


def _attention_fwd(st: _Static, q, k, v, *mask):
    out, lse = _forward(st, q, k, v, *mask)
    return out, (q, k, v, out, lse, *mask)


def _attention_bwd(st: _Static, residuals, do):
    return (*_backward(st, residuals, do), None, None, None, None, None)  # integer inputs: no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def _describe(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array | None,
              kv_positions: jax.Array | None, kv_lengths: jax.Array | None, q_segment_ids: jax.Array | None,
              kv_segment_ids: jax.Array | None, causal: bool, sliding_window: int) -> tuple[jax.Array, ...]:
    """Checks shapes (errors name the argument), fills in defaults -> int32 q_pos, kv_pos, kv_len, q_seg, kv_seg."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"flash_attention: expected q [B, T, N, H] and k, v [B, S, K, H]; got q {q.shape}, "
                         f"k {k.shape}")
    (b, t, n, h), (s, kv_heads) = q.shape, k.shape[1:3]
    if v.shape != k.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"flash_attention: k and v must be [B={b}, S, K, H={h}] and equal; got k {k.shape}, "
                         f"v {v.shape}")
    if n % kv_heads:
        raise ValueError(f"flash_attention: query heads N={n} must be a multiple of kv heads K={kv_heads}")
    if not (q.dtype == k.dtype == v.dtype and jnp.issubdtype(q.dtype, jnp.floating)):
        raise ValueError(f"flash_attention: q, k, v need one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("flash_attention: pass both q_segment_ids and kv_segment_ids, or neither")
    if sliding_window < 0 or (sliding_window and not causal):
        raise ValueError(f"flash_attention: sliding_window={sliding_window!r}: expected 0, or > 0 with causal=True")

    def given(x: jax.Array | None, name: str, shape: tuple[int, ...], default: jax.Array | int) -> jax.Array:
        if x is None:
            return jnp.broadcast_to(default, shape).astype(jnp.int32)
        if x.shape != shape:
            raise ValueError(f"flash_attention: {name} has shape {x.shape}; expected {shape}")
        return x.astype(jnp.int32)

    return (given(q_positions, "q_positions", (b, t), jnp.arange(t)),
            given(kv_positions, "kv_positions", (b, s), jnp.arange(s)),
            given(kv_lengths, "kv_lengths", (b,), s),
            given(q_segment_ids, "q_segment_ids", (b, t), 0),
            given(kv_segment_ids, "kv_segment_ids", (b, s), 0))


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "sm_scale", "block_sizes", "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array | None = None,
                    kv_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None, *,
                    causal: bool = True, sliding_window: int = 0, sm_scale: float | None = None,
                    block_sizes: BlockSizes = BlockSizes(), interpret: bool | None = None) -> jax.Array:
    """q: [B, T, N, H], k, v: [B, S, K, H] -> [B, T, N, H] in q's dtype; differentiable in q, k, v.

    q_positions / q_segment_ids: [B, T]; kv_positions / kv_segment_ids: [B, S]; kv_lengths: [B] valid
    slots per row (slots at or beyond are masked). sm_scale defaults to H ** -0.5. interpret=None
    interprets exactly when the default backend is CPU.
    """
    mask = _describe(q, k, v, q_positions, kv_positions, kv_lengths, q_segment_ids, kv_segment_ids, causal,
                     sliding_window)
    st = _Static(MaskSpec(causal, sliding_window, q.shape[1]),
                 q.shape[3] ** -0.5 if sm_scale is None else float(sm_scale), block_sizes,
                 resolve_interpret(interpret))
    return _attention(st, q, k, v, *mask)


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array | None = None,
                              kv_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                              *, causal: bool = True, sliding_window: int = 0,
                              sm_scale: float | None = None) -> jax.Array:
    """The same contract in plain jnp: materialised [B, T, S] mask, fp32 throughout, grouped heads."""
    q_pos, kv_pos, kv_len, q_seg, kv_seg = _describe(q, k, v, q_positions, kv_positions, kv_lengths,
                                                     q_segment_ids, kv_segment_ids, causal, sliding_window)
    (b, t, n, h), (s, kv_heads) = q.shape, k.shape[1:3]
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (jnp.arange(s) < kv_len[:, None])[:, None, :]
    if causal:
        mask &= kv_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window:
        mask &= kv_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    scale = h ** -0.5 if sm_scale is None else sm_scale
    hi = jax.lax.Precision.HIGHEST  # full fp32 even where the default matmul precision is TF32
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision=hi) * scale
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # a fully masked row: p = 0, not NaN
    l = p.sum(-1, keepdims=True)
    out = jnp.einsum("bkgts,bskh->btkgh", p / jnp.where(l == 0.0, 1.0, l), v.astype(jnp.float32), precision=hi)
    return out.reshape(b, t, n, h).astype(q.dtype)
