"""The blocks' two parameter layouts, and how a block is rematerialised.

Loop layout (`scan_layers=False`): one subtree per block, `params["block_<i>"]`.
Scanned layout (`scan_layers=True`): the blocks run under `nn.scan`, whose step is `cfg.scan_group`
consecutive blocks (1 for a dense model; `moe.every_n_layers` with MoE, so that every step has the same
dense / MoE pattern); `params["layers"]["block_<j>"]` holds block j of every step, each leaf stacked on a
leading axis of num_layers / scan_group steps (logical axis "layers", on no mesh axis). Block i of the loop
is step i // scan_group, position i % scan_group.

`stack_layers` / `unstack_layers` convert plain (unboxed) params between the two; everything outside the
blocks is shared. Both return params already in their target layout unchanged, so a caller need not know
which layout it holds. Converted params compute the same function in either layout; what differs is only
where random draws come from (the scan splits its keys per step): a scanned model's init for a seed is not
the loop's stacked, and noisy or jittered routing draws other (equally distributed) noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig

LAYERS = "layers"  # the scanned blocks' subtree, and the logical name of their stacked axis

# ModelConfig.remat_policy -> what the block's forward keeps for the backward (REMAT_POLICIES in config.py).
CHECKPOINT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block_cls: type[nn.Module], cfg: ModelConfig) -> type[nn.Module]:
    """The block class, rematerialised per `cfg.remat_policy` ("none": as it is)."""
    if cfg.remat_policy == "none":
        return block_cls
    # Under a scan XLA cannot merge the recomputation back into the forward (they are separate loop bodies),
    # so the guard against that (prevent_cse) would only cost: JAX's advice is to turn it off there.
    return nn.remat(block_cls, policy=CHECKPOINT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


def scan_steps(cfg: ModelConfig) -> int:
    return cfg.num_layers // cfg.scan_group


def is_stacked(params: Any) -> bool:
    """True for params in the scanned layout."""
    return LAYERS in params


def loop_position(layer: int, cfg: ModelConfig) -> tuple[str, int]:
    """Loop block `layer` in the scanned layout: (its name in params["layers"], its step)."""
    return f"block_{layer % cfg.scan_group}", layer // cfg.scan_group


def stack_layers(params: Any, cfg: ModelConfig) -> Any:
    """Loop-layout params -> the scanned layout (a copy of the blocks' weights)."""
    if is_stacked(params):
        return params
    n = cfg.scan_group
    shared = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked = {f"block_{j}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                          *[params[f"block_{i}"] for i in range(j, cfg.num_layers, n)])
               for j in range(n)}
    return {**shared, LAYERS: stacked}


def unstack_layers(params: Any, cfg: ModelConfig) -> Any:
    """Scanned-layout params -> the loop layout (each block's weights sliced out of the stacks)."""
    if not is_stacked(params):
        return params
    loop = {k: v for k, v in params.items() if k != LAYERS}
    for i in range(cfg.num_layers):
        name, step = loop_position(i, cfg)
        loop[f"block_{i}"] = jax.tree.map(lambda x: x[step], params[LAYERS][name])
    return loop


def loop_config(cfg: ModelConfig) -> ModelConfig:
    """The same model in the loop layout (what decoding runs)."""
    return dataclasses.replace(cfg, scan_layers=False)


def in_layout(params: Any, cfg: ModelConfig) -> Any:
    """params (either layout) in the layout `cfg` runs."""
    return stack_layers(params, cfg) if cfg.scan_layers else unstack_layers(params, cfg)
