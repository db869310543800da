"""The dense feed-forward block: SwiGLU (Shazeer 2020) or GELU."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.linear import linear
from models.sharding import constrain, param_with_axes


def feed_forward(x: jax.Array, w: dict[str, jax.Array], kind: str,
                 matmul: Callable[[jax.Array, jax.Array], jax.Array] = linear,
                 hidden_axes: tuple[str | None, ...] | None = None) -> jax.Array:
    """The FFN on given weights, shared by the dense MLP and the MoE experts: SwiGLU
    `(silu(x w_gate) * x w_up) w_down`, or GELU `gelu(x w_up) w_down` (no w_gate).

    matmul: how x meets a weight (`linear` for [..., D] x [D, F]; the experts pass a batched product).
    hidden_axes: logical axes to constrain the hidden activations to, if any.
    """
    up = matmul(x, w["w_up"])
    hidden = nn.silu(matmul(x, w["w_gate"])) * up if kind == "swiglu" else nn.gelu(up)
    if hidden_axes is not None:
        hidden = constrain(hidden, hidden_axes)
    return matmul(hidden, w["w_down"])


def ffn_weights(weight: Callable[[str, tuple[int, int], tuple[str, str]], jax.Array], d_model: int, d_ff: int,
                kind: str) -> dict[str, jax.Array]:
    """The weights `feed_forward` takes, each made by weight(name, [fan_in, fan_out], logical axes)."""
    w = {"w_up": weight("w_up", (d_model, d_ff), ("embed", "mlp"))}
    if kind == "swiglu":
        w["w_gate"] = weight("w_gate", (d_model, d_ff), ("embed", "mlp"))
    w["w_down"] = weight("w_down", (d_ff, d_model), ("mlp", "embed"))
    return w


class MLP(nn.Module):
    d_model: int
    d_ff: int
    kind: str = "swiglu"
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    matmul_impl: str = "xla"  # ModelConfig.matmul_impl

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        init = nn.initializers.normal(self.init_std)

        def weight(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
            return self.param(name, param_with_axes(init, axes), shape, self.param_dtype).astype(self.dtype)

        w = ffn_weights(weight, self.d_model, self.d_ff, self.kind)
        return feed_forward(x, w, self.kind, functools.partial(linear, impl=self.matmul_impl),
                            hidden_axes=("batch", "length", "act_mlp"))
