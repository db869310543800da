"""Causal self-attention: one code path for MHA, GQA and MQA, with an optional KV cache.

Query heads are grouped as [K, G] against K kv heads, so K/V are never repeated per query head
(neither in training nor in the cached decode path). The attention kernel is chosen by
`ModelConfig.attention_impl`: `ATTENTION_FNS` is the seam where fused kernels plug in.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.causal_attention import causal_attention, grouped, ungrouped
from models.config import ModelConfig
from models.kernels.decode_attention import decode_attention
from models.kernels.flash_attention import flash_attention
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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                  kv_positions: jax.Array, kv_lengths: jax.Array | None, sliding_window: int) -> jax.Array:
    """Softmax attention in plain jnp, fp32 logits and softmax, for any positions (and a KV cache).

    q: [B, T, N, H]; k, v: [B, S, K, H]; positions and lengths as in `attention_mask` -> [B, T, N, H].
    Masked logits are -inf; every query sees at least itself, so no row is fully masked. The grouped
    layout (`grouped`) makes the scores one plain batched matmul per kv head, K/V never repeated.
    """
    b, t, n, h = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    mask = attention_mask(q_positions, kv_positions, kv_lengths, sliding_window)
    logits = jnp.einsum("bkqh,bksh->bkqs", grouped(q, kv_heads), k.transpose(0, 2, 1, 3),
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    logits = jnp.where(mask[:, None, :, None, :], logits.reshape(b, kv_heads, t, n // kv_heads, s), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, -1, s)
    return ungrouped(jnp.einsum("bkqs,bksh->bkqh", probs, v.transpose(0, 2, 1, 3)), t)


# Every implementation takes (q, k, v, q_positions, kv_positions, kv_lengths, sliding_window): the mask
# is described, not materialised, so fused kernels can skip masked blocks instead of reading a mask.
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, int],
                       jax.Array]


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                     kv_lengths: jax.Array | None, sliding_window: int) -> jax.Array:
    """The Pallas kernels (`models/kernels/`): split-K decode for one new token over a cache, flash otherwise.

    Shapes as in `xla_attention`. With a cache, slot s holds position s, as the decode kernel assumes.
    On CPU the kernels run in interpret mode (slow: for tests).
    """
    if q.shape[1] == 1 and kv_lengths is not None:
        out = decode_attention(q[:, 0], k, v, kv_lengths, q_positions[:, 0], sliding_window=sliding_window)
        return out[:, None]
    return flash_attention(q, k, v, q_positions, kv_positions, kv_lengths, sliding_window=sliding_window)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                    kv_lengths: jax.Array | None, sliding_window: int) -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention`; GPU only. Shapes as in `xla_attention`.

    Without a cache the keys are the queries' own tokens, and the model's positions are consecutive,
    so cuDNN's index-causal mask (with its left window) is the position mask and nothing is
    materialised. With a cache cuDNN's causal mask (top-left aligned) does not fit, so the mask is
    passed explicitly.
    """
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"attention_impl='cudnn' needs a CUDA GPU, but the default backend is "
                           f"{jax.default_backend()!r}; use 'xla' or 'pallas'")
    if kv_lengths is None:
        window = (sliding_window - 1, 0) if sliding_window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                            implementation="cudnn")
    mask = attention_mask(q_positions, kv_positions, kv_lengths, sliding_window)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


# "cpu" is the fused CPU kernel where queries and keys are positions 0..T-1 (`causal_attention`); with a
# cache or other positions it takes the xla path.
ATTENTION_FNS: dict[str, AttentionFn] = {"xla": xla_attention, "pallas": pallas_attention,
                                         "cudnn": cudnn_attention, "cpu": xla_attention}


class Attention(nn.Module):
    cfg: ModelConfig
    # The caller's promise that positions are 0..T-1 in every row and there is no cache (the model's
    # default): the xla path then skips fully masked blocks (`causal_attention`).
    consecutive: bool = False

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
        q = constrain(q, ("batch", "length", "act_heads", None))

        if cache is None:
            keys, values, kv_positions, kv_lengths = k_new, v_new, positions, None
        else:
            cache = cache.append(k_new, v_new)
            keys, values = (x.astype(dtype) for x in cache.sequence())  # rows may share slots (beams)
            kv_lengths = cache.lengths
            kv_positions = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32),
                                            (x.shape[0], cache.max_len))
        if self.consecutive and cache is None and cfg.attention_impl in ("xla", "cpu"):
            out = causal_attention(q, keys, values, cfg.sliding_window, cfg.attention_impl == "cpu")
        else:
            out = ATTENTION_FNS[cfg.attention_impl](q, keys, values, positions, kv_positions, kv_lengths,
                                                    cfg.sliding_window)

        wo = self.param("wo", param_with_axes(init, ("heads", "head_dim", "embed")), (n, h, d), pdtype)
        return linear(out, wo.astype(dtype), fan_in_dims=2, impl=cfg.matmul_impl), cache
