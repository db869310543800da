"""The dense feed-forward block: SwiGLU (Shazeer 2020) or GELU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.linear import linear
from models.sharding import constrain, param_with_axes


class MLP(nn.Module):
    d_model: int
    d_ff: int
    kind: str = "swiglu"
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        init = nn.initializers.normal(self.init_std)

        def weight(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> jax.Array:
            return self.param(name, param_with_axes(init, axes), shape, self.param_dtype).astype(self.dtype)

        up = linear(x, weight("w_up", (self.d_model, self.d_ff), ("embed", "mlp")))
        if self.kind == "swiglu":
            gate = linear(x, weight("w_gate", (self.d_model, self.d_ff), ("embed", "mlp")))
            hidden = nn.silu(gate) * up
        else:
            hidden = nn.gelu(up)
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))
        return linear(hidden, weight("w_down", (self.d_ff, self.d_model), ("mlp", "embed")))
