"""Causal self-attention: one code path for MHA, GQA and MQA, with an optional KV cache.

Query heads are grouped as [K, G] against K kv heads, so K/V are never repeated per query head
(neither in training nor in the cached decode path). This file is the one dispatch point for attention:
`ModelConfig.attention_impl` names the algorithm (`ATTENTION_FNS`), "auto" resolving per backend:

  xla        `jax.nn.dot_product_attention` (XLA); the default on GPU and TPU
  blocked    plain jnp in the grouped layout; with positions 0..T-1 and no cache, query blocks multiply
             only the keys they can see (`blocked_attention.py`): the default on CPU
  pallas     our fused Pallas kernels (`kernels/flash_attention.py`, `kernels/decode_attention.py`)
  cudnn      cuDNN flash attention through `jax.nn.dot_product_attention`; GPU only
  cpu_fused  the CPU kernel's fused forward (`kernels/cpu`) where `blocked` skips blocks, else `blocked`
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.blocked_attention import causal_attention, grouped, ungrouped
from models.config import ModelConfig, resolve_attention_impl
from models.kernels import cpu
from models.kernels.cpu.attention import fused_causal_attention
from models.kernels.sharded import sharded_decode_attention, sharded_flash_attention
from models.kv_cache import KVCache
from models.linear import linear
from models.rope import apply_rope, rope_inverse_frequencies
from models.sharding import constrain, param_with_axes


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array, kv_lengths: jax.Array | None,
                   sliding_window: int) -> jax.Array:
    """Which keys each query may see: [B, T, S] bool.

    q_positions: [B, T]; kv_positions: [B, S]; kv_lengths: [B] valid slots per row (None: all).
    Causal (key position <= query position), optionally within the last `sliding_window` positions.
    """
    q = q_positions[:, :, None]
    kv = kv_positions[:, None, :]
    mask = kv <= q
    if sliding_window:
        mask &= kv > q - sliding_window
    if kv_lengths is not None:
        mask &= kv < kv_lengths[:, None, None]
    return mask


def logit_scale(positions: jax.Array, cfg: ModelConfig, s: jax.Array | None = None) -> jax.Array:
    """The factor on each query for `cfg.attention_logit_scaling` ("logn" or "learned"): [B, T, 1] or
    [B, T, N] float32 for positions [B, T] (and s: [N], the learned per-head scale).

    Both grow with log n, n the number of keys the query sees (p + 1, at most the sliding window), so that
    attention does not flatten as n grows past the training length L = `cfg.logit_scaling_length`:
    "logn" max(1, log n / log L), unchanged within L; "learned" s_h * log n (s starts at 1 / log L).
    """
    n = positions.astype(jnp.float32) + 1
    if cfg.sliding_window:
        n = jnp.minimum(n, cfg.sliding_window)
    log_n = jnp.log(n)[..., None]
    if cfg.attention_logit_scaling == "logn":
        return jnp.maximum(1.0, log_n / math.log(cfg.logit_scaling_length))
    return log_n * s.astype(jnp.float32)


def masked_probs(q: jax.Array, k: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                 kv_lengths: jax.Array | None, sliding_window: int) -> jax.Array:
    """Softmax attention probabilities in plain jnp, fp32 logits and softmax: [B, K, T, G, S] float32.

    q: [B, T, N, H]; k: [B, S, K, H]; positions and lengths as in `attention_mask`. Query head i = k * G + g
    reads kv head k. Masked logits are -inf; every query sees at least itself, so no row is fully masked.
    The grouped layout (`grouped`) makes the scores one plain batched matmul per kv head, K never repeated.
    """
    b, t, n, h = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    mask = attention_mask(q_positions, kv_positions, kv_lengths, sliding_window)
    logits = jnp.einsum("bkqh,bksh->bkqs", grouped(q, kv_heads), k.transpose(0, 2, 1, 3),
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    logits = jnp.where(mask[:, None, :, None, :], logits.reshape(b, kv_heads, t, n // kv_heads, s), -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     kv_positions: jax.Array, kv_lengths: jax.Array | None, sliding_window: int) -> jax.Array:
    """Softmax attention in plain jnp (`masked_probs`), for any positions (and a KV cache).

    q: [B, T, N, H]; k, v: [B, S, K, H]; positions and lengths as in `attention_mask` -> [B, T, N, H].
    """
    b, t, _, _ = q.shape
    probs = masked_probs(q, k, q_positions, kv_positions, kv_lengths, sliding_window)
    probs = probs.astype(v.dtype).reshape(b, k.shape[2], -1, k.shape[1])
    return ungrouped(jnp.einsum("bkqs,bksh->bkqh", probs, v.transpose(0, 2, 1, 3)), t)


def last_query_probs(q: jax.Array, k: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                     kv_lengths: jax.Array | None, sliding_window: int) -> jax.Array:
    """The attention probabilities of the last query (row T-1) over every key: [B, N, S] float32, for the
    attention probe (the fused attention functions never form them). Shapes as in `masked_probs`."""
    probs = masked_probs(q[:, -1:], k, q_positions[:, -1:], kv_positions, kv_lengths, sliding_window)
    return probs.reshape(q.shape[0], q.shape[2], k.shape[1])  # [B, K, 1, G, S] -> heads k * G + g


# Every implementation takes (q, k, v, q_positions, kv_positions, kv_lengths, sliding_window, arange): the
# mask is described, not materialised, so fused kernels can skip masked blocks instead of reading a mask.
# arange: the caller's promise that q and kv positions are 0..T-1 in every row and there is no cache
# (the model's default), so the mask is static (never decided from values).
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, int, bool],
                       jax.Array]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                  kv_lengths: jax.Array | None, sliding_window: int, arange: bool,
                  implementation: str = "xla") -> jax.Array:
    """`jax.nn.dot_product_attention` (XLA, or cuDNN for `cudnn_attention`). Shapes as in `masked_attention`.

    With positions 0..T-1 and no cache its index-causal mask (with its left window) is the position mask
    and nothing is materialised; otherwise (a cache, given positions) the mask is passed explicitly.
    """
    if arange:
        window = (sliding_window - 1, 0) if sliding_window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                            implementation=implementation)
    mask = attention_mask(q_positions, kv_positions, kv_lengths, sliding_window)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                      kv_lengths: jax.Array | None, sliding_window: int, arange: bool) -> jax.Array:
    """Plain jnp: causal query blocks that skip the keys they cannot see where positions are 0..T-1,
    `masked_attention` otherwise (a cache, given positions). Shapes as in `masked_attention`."""
    if arange:
        return causal_attention(q, k, v, sliding_window)
    return masked_attention(q, k, v, q_positions, kv_positions, kv_lengths, sliding_window)


def cpu_fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                        kv_positions: jax.Array, kv_lengths: jax.Array | None, sliding_window: int,
                        arange: bool) -> jax.Array:
    """The CPU kernel's forward where `blocked` skips blocks and the kernel is built (float32), else
    `blocked_attention`."""
    if arange and q.dtype == jnp.float32 and cpu.available():
        return fused_causal_attention(q, k, v, sliding_window)
    return blocked_attention(q, k, v, q_positions, kv_positions, kv_lengths, sliding_window, arange)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                     kv_lengths: jax.Array | None, sliding_window: int, arange: bool) -> jax.Array:
    """The Pallas kernels (`models/kernels/`): split-K decode for one new token over a cache, flash otherwise.

    Shapes as in `masked_attention`. With a cache, slot s holds position s, as the decode kernel assumes.
    Under a mesh each device runs them on its batch rows and heads (`kernels/sharded.py`). On CPU the
    kernels run in interpret mode (slow: for tests).
    """
    if q.shape[1] == 1 and kv_lengths is not None:
        out = sharded_decode_attention(q[:, 0], k, v, kv_lengths, q_positions[:, 0], sliding_window=sliding_window)
        return out[:, None]
    return sharded_flash_attention(q, k, v, q_positions, kv_positions, kv_lengths, sliding_window=sliding_window)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                    kv_lengths: jax.Array | None, sliding_window: int, arange: bool) -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention`; GPU only. Shapes as in `masked_attention`."""
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"attention_impl='cudnn' needs a CUDA GPU, but the default backend is "
                           f"{jax.default_backend()!r}; use 'xla', 'blocked' or 'pallas'")
    return xla_attention(q, k, v, q_positions, kv_positions, kv_lengths, sliding_window, arange, "cudnn")


ATTENTION_FNS: dict[str, AttentionFn] = {"xla": xla_attention, "blocked": blocked_attention,
                                         "pallas": pallas_attention, "cudnn": cudnn_attention,
                                         "cpu_fused": cpu_fused_attention}


class Attention(nn.Module):
    cfg: ModelConfig
    # The caller's promise that positions are 0..T-1 in every row and there is no cache (the model's
    # default): the mask is then static (see AttentionFn).
    arange_positions: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """x: [B, T, D], positions: [B, T] -> ([B, T, D], updated cache).

        Without a cache the T tokens attend causally among themselves (training, scoring).
        With a cache they are appended at each row's length and attend to everything cached.
        """
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        init = nn.initializers.normal(cfg.init_std)

        def project(name: str, heads: int, axis: str) -> jax.Array:
            w = self.param(name, param_with_axes(init, ("embed", axis, "head_dim")), (d, heads, h), pdtype)
            y = linear(x, w.astype(dtype), impl=cfg.matmul_impl)
            if cfg.qkv_bias:
                bias = self.param(name + "_bias", param_with_axes(nn.initializers.zeros, (axis, "head_dim")),
                                  (heads, h), pdtype)
                y = y + bias.astype(dtype)
            return y

        q = project("wq", n, "heads")
        k_new = project("wk", k, "kv_heads")
        v_new = project("wv", k, "kv_heads")
        if cfg.position == "rope":
            inv_freq = rope_inverse_frequencies(h, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor)
            q = apply_rope(q, positions, inv_freq)
            k_new = apply_rope(k_new, positions, inv_freq)
        if cfg.attention_logit_scaling != "none":  # on q, so every attention_impl and the cache see it
            s = None
            if cfg.attention_logit_scaling == "learned":
                s = self.param("logit_scale", param_with_axes(
                    nn.initializers.constant(1 / math.log(cfg.logit_scaling_length)), ("heads",)), (n,), pdtype)
            q = (q.astype(jnp.float32) * logit_scale(positions, cfg, s)[..., None]).astype(q.dtype)
        q = constrain(q, ("batch", "length", "act_heads", None))

        if cache is None:
            keys, values, kv_positions, kv_lengths = k_new, v_new, positions, None
        else:
            cache = cache.append(k_new, v_new)
            keys, values = (x.astype(dtype) for x in cache.sequence())  # rows may share slots (beams)
            kv_lengths = cache.lengths
            kv_positions = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32),
                                            (x.shape[0], cache.max_len))
        attend = ATTENTION_FNS[resolve_attention_impl(cfg.attention_impl)]
        out = attend(q, keys, values, positions, kv_positions, kv_lengths, cfg.sliding_window,
                     self.arange_positions and cache is None)
        if self.is_mutable_collection("intermediates"):  # the attention probe (models/attention_probe.py)
            self.sow("intermediates", "last_query_attention",
                     last_query_probs(q, keys, positions, kv_positions, kv_lengths, cfg.sliding_window))

        wo = self.param("wo", param_with_axes(init, ("heads", "head_dim", "embed")), (n, h, d), pdtype)
        return linear(out, wo.astype(dtype), fan_in_dims=2, impl=cfg.matmul_impl), cache
