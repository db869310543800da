"""The attention probe: where each layer's last query puts its attention, for the attention-dilution study.

`Attention` sows its last query's probabilities over every key (`last_query_probs`) whenever apply() is
called with mutable=["intermediates"]; other calls compute nothing extra. This collects them per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.layers import LAYERS, loop_position
from models.transformer import Transformer

PROBE = "last_query_attention"  # the name Attention sows under


@functools.partial(jax.jit, static_argnums=0)
def _intermediates(cfg: ModelConfig, params: Any, ids: jax.Array) -> Any:
    _, state = Transformer(cfg).apply({"params": params}, ids, mutable=["intermediates"])
    return state["intermediates"]


def last_query_attention(cfg: ModelConfig, params: Any, ids: Any) -> np.ndarray:
    """ids: [B, T] int -> [layers, B, N, S=T] float32: each layer's softmax over the keys of the query at
    position T-1, per query head (the positions 0..T-1 of a training forward, no cache).

    params in the layout `cfg` runs (with `scan_layers` the sown arrays come stacked per scan step).
    """
    found = _intermediates(cfg, params, jnp.asarray(ids))
    if cfg.scan_layers:
        steps = [loop_position(i, cfg) for i in range(cfg.num_layers)]
        layers = [found[LAYERS][name]["attn"][PROBE][0][step] for name, step in steps]
    else:
        layers = [found[f"block_{i}"]["attn"][PROBE][0] for i in range(cfg.num_layers)]
    return np.stack([np.asarray(x) for x in layers])
