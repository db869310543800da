"""Sparse mixture-of-experts FFN: router, capacity and dropping, dispatch/combine, balancing losses, stats.

Each token's router picks top_k of E experts and only those experts compute it. Tokens reach their
experts by gather/scatter (measured faster on CPU than GShard's one-hot dispatch einsum, see
experiments/benchmark_moe.py), in one of two layouts:

  capacity  every sequence is a group: expert e takes at most C of its tokens into a buffer
            [E, B, C, D]; an assignment past C is dropped (its MoE output is zero and the residual
            carries the token). The buffer's E axis lies on the mesh `expert` axis (expert parallelism).
  dropless  (capacity factor 0) assignments are sorted by expert and each expert's run is padded to
            whole blocks of rows; a loop over the blocks computes each with its expert's weights (or,
            where `linear.ragged_linear` multiplies only each run's rows, the runs as they are).
            Nothing is dropped.

Capacity is per sequence, from its real tokens (padding, marked by `valid`, takes none). So at decode
time a capacity factor means little: a one-token step never drops (C >= 1 for its one token), while a
full forward over the same sequence may, and cached and full-recompute logits can differ by design.

The router runs in fp32. The layer returns `(y, aux)`: aux["losses"] (already weighted),
aux["stats"] (routing statistics) and, in training with the auxiliary-loss-free bias,
aux["router_bias"], the bias for the next step.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.linear import expert_linear, linear, multiplies_ragged, ragged_linear
from models.mlp import feed_forward, ffn_weights
from models.sharding import constrain, param_with_axes

# Rows per block in the dropless layout: large enough for efficient matmuls, small enough that the
# padding (under one block per expert) stays a small fraction of the rows.
DROPLESS_BLOCK = 256
BUFFER_AXES = ("act_expert", "act_group", None, "act_embed")  # [E, B, C, D]
EPS = 1e-10  # keeps the coefficient of variation finite when every count is zero

Weights = dict[str, jax.Array]


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """C = ceil(k * tokens / E * factor), at most `tokens` (a token picks an expert at most once)."""
    # Rounded first so that, e.g., 2 * 100 / 8 * 1.2 = 30.000000000000004 gives 30, not 31.
    return min(tokens, math.ceil(round(top_k * tokens / num_experts * factor, 9)))


def expert_ffn(h: jax.Array, w: Weights, kind: str, impl: str = "xla") -> jax.Array:
    """Stacked experts, h: [X, ..., D] with w_up/w_gate [X, D, F] and w_down [X, F, D] -> [X, ..., D]
    (X: the expert axis of the capacity buffers); or one expert, h: [R, D] with [D, F] / [F, D] -> [R, D].
    impl: ModelConfig.matmul_impl.

    Each expert's rows are flattened into one matrix, as in `models/linear.py`: with several row dims
    (or a batch of one expert) XLA:CPU copied each output gradient into a transposed layout before the
    weight-gradient matmul. Train step without the copies, interleaved A/B: dropless +6%, capacity +8%.
    """
    shape = h.shape
    if w["w_up"].ndim == 2:
        return feed_forward(h, w, kind, functools.partial(linear, impl=impl))
    h = h.reshape(shape[0], -1, shape[-1])
    return feed_forward(h, w, kind, functools.partial(expert_linear, impl=impl)).reshape(shape)


def slot_positions(experts: jax.Array, order: jax.Array | None, num_experts: int,
                   valid: jax.Array | None = None) -> jax.Array:
    """Each assignment's place in its expert's queue within its sequence: [B, T, K] int32.

    experts: [B, T, K]. Queues fill choice by choice, every token's first choice before any second
    choice (GShard), and within a choice in `order`: [B, T] token indices, highest priority first
    (None: sequence order). valid: [B, T] bool; padding joins no queue (its places are meaningless).
    """
    b, t, k = experts.shape
    if order is not None:
        experts = jnp.take_along_axis(experts, order[..., None], axis=1)
        valid = None if valid is None else jnp.take_along_axis(valid, order, axis=1)
    queue = jnp.swapaxes(experts, 1, 2).reshape(b, k * t)  # fill order
    onehot = jax.nn.one_hot(queue, num_experts, dtype=jnp.int32)  # [B, K*T, E]
    if valid is not None:
        onehot = onehot * jnp.tile(valid, (1, k))[..., None]
    pos = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
    pos = jnp.swapaxes(pos.reshape(b, k, t), 1, 2)
    if order is not None:
        pos = jnp.take_along_axis(pos, jnp.argsort(order, axis=1)[..., None], axis=1)
    return pos


def capacity_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array, order: jax.Array | None,
                      capacity: int, w: Weights, kind: str, impl: str = "xla", valid: jax.Array | None = None,
                      row_capacity: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x: [B, T, D]; experts, gates: [B, T, K] -> (y [B, T, D], kept [B, T, K] bool).

    Assignments past an expert's capacity are dropped. w: the stacked expert weights. valid: [B, T] bool,
    False at padding, which is never kept; row_capacity: [B] each row's capacity (<= capacity, the
    buffer's), from its real token count.
    """
    b, t, d = x.shape
    num_experts = w["w_up"].shape[0]
    rows = num_experts * b * capacity
    pos = slot_positions(experts, order, num_experts, valid)
    kept = pos < (capacity if row_capacity is None else row_capacity[:, None, None])
    if valid is not None:
        kept &= valid[..., None]
    seq = jnp.arange(b)[:, None, None]
    # Buffer row of each assignment; a dropped one points past the end, at a zero row.
    slot = jnp.where(kept, (experts * b + seq) * capacity + pos, rows)
    token = jnp.broadcast_to(jnp.arange(b * t).reshape(b, t, 1), slot.shape)
    source = jnp.full((rows,), b * t, jnp.int32).at[slot.reshape(-1)].set(token.reshape(-1), mode="drop")
    x_rows = jnp.concatenate([x.reshape(b * t, d), jnp.zeros((1, d), x.dtype)])
    h = constrain(x_rows[source].reshape(num_experts, b, capacity, d), BUFFER_AXES)
    out = constrain(expert_ffn(h, w, kind, impl), BUFFER_AXES).reshape(rows, d)
    out = jnp.concatenate([out, jnp.zeros((1, d), out.dtype)])
    y = jnp.einsum("btkd,btk->btd", out[slot], (gates * kept).astype(out.dtype))
    return y, kept


def dropless_dispatch(x: jax.Array, experts: jax.Array, gates: jax.Array, w: Weights, kind: str,
                      impl: str = "xla") -> jax.Array:
    """x: [N, D]; experts, gates: [N, K] -> [N, D], every assignment computed. w: stacked expert weights."""
    n, d = x.shape
    k = experts.shape[1]
    num_experts = w["w_up"].shape[0]
    a = n * k
    flat = experts.reshape(a)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert, token order within
    counts = jnp.bincount(flat, length=num_experts)
    if multiplies_ragged(impl):
        # Each expert's run of sorted rows as it is: no padding to blocks.
        out = feed_forward(x[order // k], w, kind, functools.partial(ragged_linear, sizes=counts, impl=impl))
        out = jnp.zeros_like(out).at[order].set(out)
        return jnp.einsum("nkd,nk->nd", out.reshape(n, k, d), gates.astype(out.dtype))
    # Padding is under one block per expert, so a block of at most a / (4E) rows wastes at most a
    # quarter of the rows; tiny inputs (decoding) get tiny blocks.
    block = max(1, min(DROPLESS_BLOCK, a // (4 * num_experts)))
    padded = -(-counts // block) * block
    ends = jnp.cumsum(padded)
    sorted_experts = flat[order]
    rank = jnp.arange(a) - (jnp.cumsum(counts) - counts)[sorted_experts]
    row = jnp.zeros((a,), jnp.int32).at[order].set((ends - padded)[sorted_experts] + rank)
    blocks = (a + num_experts * (block - 1)) // block  # >= sum_e ceil(counts_e / block)
    source = jnp.full((blocks * block,), n, jnp.int32).at[row].set(jnp.arange(a) // k)
    block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(blocks) * block, side="right"),
                               num_experts - 1)
    x_rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])

    def one_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        rows, e = args  # [R, D], []
        # Indexed in place inside the loop: gathering every block's weights up front copies them once
        # per block and measured twice as slow.
        we = {name: jax.lax.dynamic_index_in_dim(v, e, keepdims=False) for name, v in w.items()}
        return expert_ffn(rows, we, kind)

    out = jax.lax.map(one_block, (x_rows[source].reshape(blocks, block, d), block_expert))
    out = out.reshape(blocks * block, d)
    return jnp.einsum("nkd,nk->nd", out[row].reshape(n, k, d), gates.astype(out.dtype))


def smooth_load(clean: jax.Array, logits: jax.Array, noise_std: jax.Array, top_k: int,
                valid: jax.Array | None = None) -> jax.Array:
    """Shazeer et al.'s differentiable load: [E].

    Load_i = sum over tokens of P(expert i is in the top k when its noise is resampled)
           = Phi((clean_i - kth_excluding(logits, k, i)) / noise_std_i).
    clean, logits (= clean + noise), noise_std: [B, T, E]; valid: [B, T], False at padding (not counted).
    """
    e = logits.shape[-1]
    if top_k == e:  # every expert is always chosen
        tokens = logits.shape[0] * logits.shape[1] if valid is None else jnp.sum(valid)
        return jnp.full((e,), tokens, jnp.float32)
    top = jax.lax.top_k(logits, top_k + 1)[0]
    chosen = logits >= top[..., top_k - 1:top_k]
    # The k-th largest of the others: the (k+1)-th overall for a chosen expert, the k-th otherwise.
    threshold = jnp.where(chosen, top[..., top_k:], top[..., top_k - 1:top_k])
    cdf = jax.scipy.stats.norm.cdf((clean - threshold) / noise_std)
    return jnp.sum(cdf if valid is None else jnp.where(valid[..., None], cdf, 0.0), axis=(0, 1))


def cv(x: jax.Array) -> jax.Array:
    """Coefficient of variation std / mean over experts (population std)."""
    return jnp.std(x) / (jnp.mean(x) + EPS)


class MoE(nn.Module):
    """The MoE FFN. `train` selects noise, jitter and the training capacity factor.

    Noise and jitter draw from the "router" RNG stream (`rngs={"router": key}` in `apply`).
    """

    cfg: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """x: [B, T, D] -> (y [B, T, D], aux).

        valid: [B, T] bool, False at padding (a right-padded prefill): padding takes no capacity (each
        row's capacity comes from its real tokens, so a prompt routes the same alone or in a padded batch)
        and is left out of the losses and statistics. Its outputs are meaningless; causal attention never
        lets a real token read them.
        """
        cfg, moe = self.cfg, self.cfg.moe
        e, k, d, f = moe.num_experts, moe.top_k, cfg.d_model, moe.d_ff or cfg.d_ff
        b, t, _ = x.shape
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        # Router, in fp32: small logit differences decide the routing.
        router_init = nn.initializers.zeros if moe.zero_init_router else nn.initializers.normal(cfg.init_std)

        def router_weight(name: str) -> jax.Array:
            return self.param(name, param_with_axes(router_init, ("embed", None)), (d, e),
                              pdtype).astype(jnp.float32)

        xr = x.astype(jnp.float32)
        if self.train and moe.jitter:
            xr = xr * jax.random.uniform(self.make_rng("router"), xr.shape, jnp.float32,
                                         1 - moe.jitter, 1 + moe.jitter)
        clean = jnp.einsum("btd,de->bte", xr, router_weight("router"))
        logits, noise_std = clean, None
        if moe.router == "noisy":
            noise_std = nn.softplus(jnp.einsum("btd,de->bte", xr, router_weight("router_noise")))
            if self.train:
                logits = clean + jax.random.normal(self.make_rng("router"), clean.shape) * noise_std
        probs = jax.nn.softmax(logits, axis=-1)
        scores = probs
        if moe.bias_update_rate:
            # Kept in fp32 whatever param_dtype is: updates of u = 1e-3 would vanish in bf16.
            bias = self.param("router_bias", param_with_axes(nn.initializers.zeros, ("expert",)), (e,),
                              jnp.float32)
            scores = probs + jax.lax.stop_gradient(bias)  # selection only: gates use the unbiased probs
        experts = jax.lax.top_k(scores, k)[1]  # [B, T, K]
        # Kept only when apply() is called with mutable=["intermediates"] (e.g. to colour text by expert).
        self.sow("intermediates", "experts", experts)
        top_probs = jnp.take_along_axis(probs, experts, axis=-1)
        gates = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True) if moe.renormalize else top_probs

        # Experts, stacked [E, D, F].
        init = nn.initializers.normal(cfg.init_std)

        def expert_weight(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
            return self.param(name, param_with_axes(init, ("expert",) + axes), (e,) + shape, pdtype).astype(dtype)

        w = ffn_weights(expert_weight, d, f, cfg.mlp)

        xc = x.astype(dtype)
        factor = moe.capacity_factor if self.train else moe.eval_capacity_factor
        kept = jnp.ones(experts.shape, bool)
        if moe.router == "dense":
            out = expert_ffn(jnp.broadcast_to(xc, (e,) + xc.shape), w, cfg.mlp, cfg.matmul_impl)  # [E, B, T, D]
            y = jnp.einsum("ebtd,bte->btd", out, probs.astype(dtype))
        elif factor == 0:
            y = dropless_dispatch(xc.reshape(b * t, d), experts.reshape(b * t, k), gates.reshape(b * t, k), w,
                                  cfg.mlp, cfg.matmul_impl).reshape(b, t, d)
        else:
            order = None if moe.priority == "order" else jnp.argsort(-top_probs[..., 0], axis=1, stable=True)
            row_capacity = None
            if valid is not None:  # C from each row's real token count, read from a table of exact values
                table = np.array([expert_capacity(n, k, e, factor) for n in range(t + 1)], np.int32)
                row_capacity = jnp.asarray(table)[jnp.sum(valid, axis=1)]
            y, kept = capacity_dispatch(xc, experts, gates, order, expert_capacity(t, k, e, factor), w, cfg.mlp,
                                        cfg.matmul_impl, valid, row_capacity)

        # Balancing losses and statistics. Loads count assignments before any are dropped; the dense
        # router's describe its top-k choice.
        # Over real tokens only: `real` zeroes padding's entries, `token_mean` averages over real tokens.
        def real(v: jax.Array) -> jax.Array:  # v: [B, T, ...]
            return v if valid is None else jnp.where(valid.reshape(valid.shape + (1,) * (v.ndim - 2)), v, 0)

        tokens = b * t if valid is None else jnp.maximum(jnp.sum(valid), 1)

        def token_mean(v: jax.Array) -> jax.Array:  # [B, T, ...] -> [...]
            return jnp.mean(v, axis=(0, 1)) if valid is None else jnp.sum(real(v), axis=(0, 1)) / tokens

        chosen = real(jax.nn.one_hot(experts, e, dtype=jnp.float32))  # [B, T, K, E]
        counts = jnp.sum(chosen, axis=(0, 1, 2))
        fraction = counts / (tokens * k)  # f_i; sums to 1 for any k, so uniform routing gives alpha
        mean_prob = token_mean(probs)  # P_i
        importance = jnp.sum(chosen * gates[..., None], axis=(0, 1, 2))
        lse = jax.nn.logsumexp(logits, axis=-1)
        losses = {}
        if moe.switch_loss_weight:
            losses["switch_loss"] = moe.switch_loss_weight * e * jnp.sum(fraction * mean_prob)
        if moe.importance_loss_weight:
            losses["importance_loss"] = moe.importance_loss_weight * cv(importance) ** 2
        if moe.load_loss_weight:
            losses["load_loss"] = moe.load_loss_weight * cv(smooth_load(clean, logits, noise_std, k, valid)) ** 2
        if moe.z_loss_weight:
            losses["z_loss"] = moe.z_loss_weight * token_mean(lse ** 2)
        max_load = jnp.max(counts) / jnp.mean(counts)
        kept_f = kept.astype(jnp.float32)
        stats = {
            "expert_fraction": fraction,
            "router_prob": mean_prob,
            "load_cv": cv(counts),
            "importance_cv": cv(importance),
            "max_load": max_load,  # max / mean
            "max_violation": max_load - 1,  # MaxVio = (max - mean) / mean
            "router_entropy": token_mean(jnp.sum(jax.scipy.special.entr(probs), axis=-1)),
            # Of token-expert assignments.
            "dropped_fraction": 1 - (jnp.mean(kept_f) if valid is None else jnp.sum(real(kept_f)) / (tokens * k)),
            "router_logsumexp": token_mean(lse),
        }
        aux: dict[str, Any] = {"losses": losses, "stats": stats}
        if moe.bias_update_rate and self.train:
            aux["router_bias"] = bias + moe.bias_update_rate * jnp.sign(jnp.mean(counts) - counts)
        return y.astype(x.dtype), aux
