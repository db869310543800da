"""The decoder-only LM: embed -> pre-norm blocks -> final norm -> LM head.

One forward path serves training, prefill and decode:
    logits, cache, aux = Transformer(cfg).apply({"params": params}, tokens, positions, cache)
`aux` is a dict of auxiliary outputs (losses and statistics from layers such as MoE); the trainer
adds every `aux["losses"]` entry to the objective and logs `aux["stats"]`. In training
(`train=True`, with `rngs={"router": key}` for noisy routing) MoE layers with the auxiliary-loss-free
bias also return `aux["router_bias"]`, the per-block biases for the next step (`with_router_biases`).

With `cfg.scan_layers` the blocks run under `nn.scan` (one traced and compiled body, params stacked on a
"layers" axis; models/layers.py has the layouts and the conversions); the loop layout runs them one by one
and is the one decoding uses. `cfg.remat_policy` rematerialises each block in either.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import Attention
from models.config import ModelConfig
from models.embeddings import Embed, LearnedPositions, sinusoidal_positions
from models.kv_cache import KVCache
from models.layers import LAYERS, loop_position, remat_block, scan_steps, unstack_layers
from models.linear import linear, prepare_weight
from models.mlp import MLP
from models.moe import MoE
from models.norms import make_norm
from models.sharding import constrain, param_with_axes

Aux = dict[str, Any]


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool = False  # a mixture-of-experts FFN instead of the dense MLP
    train: bool = False
    arange_positions: bool = False  # positions are 0..T-1 in every row and there is no cache (see Attention)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None,
                 valid: jax.Array | None = None) -> tuple[jax.Array, KVCache | None, Aux]:
        """x: [B, T, D] -> ([B, T, D], cache, aux); pre-norm residual attention then MLP (or MoE)."""
        cfg = self.cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        h = make_norm(cfg.norm, cfg.norm_eps, pdtype, "attn_norm")(x)
        h, cache = Attention(cfg, self.arange_positions, name="attn")(h, positions, cache)
        x = x + h
        h = make_norm(cfg.norm, cfg.norm_eps, pdtype, "mlp_norm")(x)
        if self.moe:
            h, aux = MoE(cfg, self.train, name="moe")(h, valid)
        else:
            h, aux = MLP(cfg.d_model, cfg.d_ff, cfg.mlp, cfg.init_std, jnp.dtype(cfg.dtype), pdtype,
                         cfg.matmul_impl, name="mlp")(h), {}
        x = x + h
        return constrain(x, ("batch", "length", "act_embed")), cache, aux


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: tuple[KVCache, ...] | None = None,
                 input_embeddings: jax.Array | None = None, train: bool = False,
                 return_hidden: bool = False, valid: jax.Array | None = None) -> tuple[jax.Array, Any, Aux]:
        """tokens: [B, T] int -> (logits [B, T, V] fp32, updated caches or None, aux).

        input_embeddings: [B, T, D] used instead of looking up `tokens` (gradient probes, soft prompts).
        train: training-only behaviour (router noise and jitter, the training capacity factor).
        return_hidden: return the final-norm hidden states [B, T, D] (compute dtype) instead of the
        logits; the training loss applies the head (`head_weight`) to them in chunks.

        positions: [B, T]; default arange(T) without a cache. With a cache, positions are always
        each row's cached length + arange(T), because a position is also its cache slot.
        valid: [B, T] bool, False at padding (a right-padded prompt's prefill): padding is never routed
        to an expert, takes no capacity and is left out of the routing statistics. None: all real.
        """
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        t = tokens.shape[1]
        arange_positions = cache is None and positions is None  # static: attention may skip masked blocks
        if cache is not None:
            positions = cache[0].lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)

        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype, pdtype, name="embed")
        x = embed(tokens) if input_embeddings is None else input_embeddings.astype(dtype)
        if cfg.position == "learned":
            x = x + LearnedPositions(cfg.max_seq_len, cfg.d_model, cfg.init_std, pdtype,
                                     name="pos_embed")(positions).astype(dtype)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, cfg.d_model).astype(dtype)
        x = constrain(x, ("batch", "length", "act_embed"))

        if cfg.scan_layers:
            if cache is not None:
                raise ValueError("a KV cache needs the loop layout: decode a scanned model with "
                                 "models.layers.loop_config(cfg) and unstack_layers(params) (decoding.steps does)")
            x, aux = self._scanned_blocks(x, positions, valid, train, arange_positions)
            new_cache = None
        else:
            x, new_cache, aux = self._looped_blocks(x, positions, cache, valid, train, arange_positions)

        x = make_norm(cfg.norm, cfg.norm_eps, pdtype, "final_norm")(x)
        if return_hidden:
            return x, new_cache, aux
        if cfg.tie_embeddings:
            logits = embed.attend(x, cfg.matmul_impl)
        else:
            w = self.param("lm_head", param_with_axes(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
                           (cfg.d_model, cfg.vocab_size), pdtype)
            logits = linear(x, w.astype(dtype), impl=cfg.matmul_impl, out_dtype=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab")), new_cache, aux

    def _looped_blocks(self, x: jax.Array, positions: jax.Array, cache: tuple[KVCache, ...] | None,
                       valid: jax.Array | None, train: bool, arange_positions: bool) -> tuple[jax.Array, Any, Aux]:
        """The blocks one after another, as `block_<i>` (the loop layout)."""
        cfg = self.cfg
        block_cls = remat_block(Block, cfg)
        new_cache, aux = [], _empty_aux()
        for i in range(cfg.num_layers):
            name = f"block_{i}"
            x, layer_cache, layer_aux = block_cls(cfg, cfg.is_moe_layer(i), train, arange_positions, name=name)(
                x, positions, None if cache is None else cache[i], valid)
            new_cache.append(layer_cache)
            _add_block_aux(aux, name, layer_aux)
            if "router_bias" in layer_aux:
                aux.setdefault("router_bias", {})[name] = layer_aux["router_bias"]
        return x, tuple(new_cache) if cache is not None else None, aux

    def _scanned_blocks(self, x: jax.Array, positions: jax.Array, valid: jax.Array | None, train: bool,
                        arange_positions: bool) -> tuple[jax.Array, Aux]:
        """The blocks as `nn.scan` over `BlockGroup`s (the scanned layout, models/layers.py). The per-step
        aux comes out stacked; it is reported per block under the loop's names, so the objective and the
        metrics do not depend on the layout."""
        cfg = self.cfg
        scan = nn.scan(BlockGroup, variable_axes={"params": 0, "intermediates": 0},
                       split_rngs={"params": True, "router": True}, in_axes=(nn.broadcast, nn.broadcast),
                       length=scan_steps(cfg), metadata_params={nn.PARTITION_NAME: LAYERS})
        x, group_aux = scan(cfg, train, arange_positions, name=LAYERS)(x, positions, valid)
        aux = _empty_aux()
        for i in range(cfg.num_layers):
            name, step = loop_position(i, cfg)
            layer_aux = {k: group_aux[name][k] for k in ("losses", "stats") if k in group_aux[name]}
            _add_block_aux(aux, f"block_{i}", jax.tree.map(lambda v: v[step], layer_aux))
        biases = {name: a["router_bias"] for name, a in group_aux.items() if "router_bias" in a}
        if biases:  # stacked as the params are, for `with_router_biases`
            aux["router_bias"] = {LAYERS: biases}
        return x, aux


class BlockGroup(nn.Module):
    """One step of the scanned blocks: `cfg.scan_group` consecutive blocks, `block_<j>` (the last one MoE
    when the model has experts). x is the scan's carry; the blocks' aux are its per-step outputs."""

    cfg: ModelConfig
    train: bool = False
    arange_positions: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, Aux]:
        cfg = self.cfg
        block_cls = remat_block(Block, cfg)
        group_aux = {}
        for j in range(cfg.scan_group):
            name = f"block_{j}"
            x, _, group_aux[name] = block_cls(cfg, cfg.is_moe_layer(j), self.train, self.arange_positions,
                                              name=name)(x, positions, None, valid)
        return x, group_aux


def _empty_aux() -> Aux:
    return {"losses": {}, "stats": {}}


def _add_block_aux(aux: Aux, name: str, block_aux: Aux) -> None:
    """Adds one block's losses and statistics to the model's aux, under `moe/<block name>/`."""
    for kind in ("losses", "stats"):
        aux[kind].update({f"moe/{name}/{key}": v for key, v in block_aux.get(kind, {}).items()})


def head_weight(cfg: ModelConfig, params: Any) -> jax.Array:
    """The LM head as a [D, V] matrix in the compute dtype: logits = hidden @ head_weight."""
    w = params["embed"]["table"].T if cfg.tie_embeddings else params["lm_head"]
    return w.astype(cfg.dtype)


# Where `linear` meets each weight the model declares: leaf name -> (fan_in_dims, transposed).
_PRODUCTS = {"wq": (1, False), "wk": (1, False), "wv": (1, False), "wo": (2, False), "w_up": (1, False),
             "w_gate": (1, False), "w_down": (1, False), "lm_head": (1, False)}


def prepare_params(params: Any, cfg: ModelConfig, rows: int) -> Any:
    """params for a loop of steps over `rows` rows each (a decode loop), made once before it: the weights
    `linear` multiplies cast to the compute dtype, and each prepared by `models.linear.prepare_weight`
    (in the layout of a faster product for few rows, where the backend has one). The result goes into
    `apply` like params.

    Expert weights (inside "moe") are cast only: the experts' products are batched, not `linear`'s.
    The result is in the loop layout (decoding always runs it: decoding/steps.py says why).
    """
    dtype = jnp.dtype(cfg.dtype)
    params = unstack_layers(params, cfg)

    def prepare(path: tuple[str, ...], w: jax.Array) -> Any:
        if path[-1] == "table" and path[-2] == "embed" and cfg.tie_embeddings:
            return prepare_weight(w.astype(dtype), cfg.matmul_impl, rows, transposed=True)
        if path[-1] not in _PRODUCTS:
            return w
        if "moe" in path:
            return w.astype(dtype)
        fan_in_dims, transposed = _PRODUCTS[path[-1]]
        return prepare_weight(w.astype(dtype), cfg.matmul_impl, rows, fan_in_dims, transposed)

    return jax.tree_util.tree_map_with_path(lambda p, w: prepare(tuple(k.key for k in p), w), params)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Parameters boxed with logical axis names (`nn.LogicallyPartitioned` leaves)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return Transformer(cfg).init(rng, tokens)["params"]


def with_router_biases(params: Any, biases: dict[str, Any]) -> Any:
    """params with each named block's MoE router bias replaced (biases: aux["router_bias"], which mirrors
    the params down to the blocks: {"block_<i>": bias}, or {"layers": {"block_<j>": stacked}} when scanned).

    The bias is a parameter so that evaluation and decoding, which take only params, route with it;
    it never gets a gradient, and this replacement is its only update.
    """
    params = dict(params)
    for name, bias in biases.items():
        if isinstance(bias, dict):
            params[name] = with_router_biases(params[name], bias)
        else:
            params[name] = {**params[name], "moe": {**params[name]["moe"], "router_bias": bias}}
    return params


def unbox(tree: Any) -> Any:
    """Strips logical-axis boxes, leaving plain arrays."""
    return nn.meta.unbox(tree)
